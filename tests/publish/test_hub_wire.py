"""`push_folder` with the real `huggingface_hub.HfApi` against a loopback stand-in of the Hub API.

The stand-in serves the endpoints that an upload of small files calls: create repo,
create branch, list the tree, validate the card's YAML, preupload and commit. It records
every request, so the tests see what goes over the wire: the files of the commit, where
the token appears, and how a rejected card comes back.
"""

from __future__ import annotations

import base64
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from huggingface_hub import HfApi

from mergekit_ext.hub import PublishError, plan_upload, push_folder


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class HubState:
    """What the stand-in returns and what it received."""

    requests: list[Request] = field(default_factory=list)
    remote_files: list[str] = field(default_factory=list)
    yaml_errors: list[str] = field(default_factory=list)


def make_handler(state: HubState) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def reply(self, status: int, payload: Any) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def record(self) -> Request:
            length = int(self.headers.get("Content-Length") or 0)
            request = Request(self.command, self.path, {k.lower(): v for k, v in self.headers.items()}, self.rfile.read(length))
            state.requests.append(request)
            return request

        def do_GET(self) -> None:
            self.record()
            if "/tree/" in self.path:
                files = [{"type": "file", "path": path, "size": 1, "oid": "0" * 40} for path in state.remote_files]
                self.reply(200, files)
            else:
                self.reply(404, {"error": "not found"})

        def do_POST(self) -> None:
            request = self.record()
            host = f"http://{self.headers['Host']}"
            if self.path == "/api/repos/create":
                self.reply(200, {"url": f"{host}/org/m", "name": "org/m"})
            elif self.path == "/api/validate-yaml":
                errors = [{"message": message} for message in state.yaml_errors]
                self.reply(400 if errors else 200, {"errors": errors, "warnings": []})
            elif "/branch/" in self.path:
                self.reply(200, {})
            elif "/preupload/" in self.path:
                files = json.loads(request.body)["files"]
                self.reply(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]})
            elif "/commit/" in self.path:
                self.reply(200, {"commitUrl": f"{host}/org/m/commit/{'a' * 40}", "commitOid": "a" * 40})
            else:
                self.reply(404, {"error": "not found"})

    return Handler


@pytest.fixture
def hub_server() -> Iterator[tuple[HfApi, HubState]]:
    state = HubState()
    server = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(state))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield HfApi(endpoint=f"http://127.0.0.1:{server.server_address[1]}"), state
    server.shutdown()
    server.server_close()


def commit_operations(state: HubState) -> list[dict[str, Any]]:
    commit = next(request for request in state.requests if "/commit/" in request.path)
    return [json.loads(line) for line in commit.body.decode().splitlines() if line.strip()]


def test_wire_requests(merged_folder: Path, hub_server, fake_token: str) -> None:
    client, state = hub_server
    push_folder(plan_upload(merged_folder, "org/m", revision="dev", private=True), token=fake_token, client=client)

    paths = [(request.method, request.path.split("?")[0]) for request in state.requests]
    assert paths == [
        ("POST", "/api/repos/create"),
        ("POST", "/api/models/org/m/branch/dev"),
        ("GET", "/api/models/org/m/tree/dev"),
        ("POST", "/api/validate-yaml"),
        ("POST", "/api/models/org/m/preupload/dev"),
        ("POST", "/api/models/org/m/commit/dev"),
    ]
    assert json.loads(state.requests[0].body) == {"name": "m", "organization": "org", "visibility": "private"}
    for request in state.requests:
        assert request.headers["authorization"] == f"Bearer {fake_token}"
        assert fake_token.encode() not in request.body


def test_wire_commit_files(merged_folder: Path, hub_server, fake_token: str) -> None:
    client, state = hub_server
    state.remote_files = ["model-00001-of-00002.safetensors", "model.safetensors.index.json", "notes.txt"]
    push_folder(plan_upload(merged_folder, "org/m"), token=fake_token, client=client)

    operations = commit_operations(state)
    assert operations[0]["value"]["summary"] == "Upload ties-merge with mergekit-ext"
    added = {op["value"]["path"]: base64.b64decode(op["value"]["content"]) for op in operations if op["key"] == "file"}
    expected = {path.name: path.read_bytes() for path in merged_folder.iterdir() if path.is_file()}
    assert added == expected
    # Stale weights from an earlier push go; other remote files stay.
    deleted = [op["value"]["path"] for op in operations if op["key"] == "deletedFile"]
    assert sorted(deleted) == ["model-00001-of-00002.safetensors", "model.safetensors.index.json"]


def test_wire_rejected_card(merged_folder: Path, hub_server, fake_token: str) -> None:
    client, state = hub_server
    state.yaml_errors = ['"base_model" with value "base" is not valid']
    with pytest.raises(PublishError) as raised:
        push_folder(plan_upload(merged_folder, "org/m"), token=fake_token, client=client)
    message = str(raised.value)
    assert message.startswith(f"uploading {merged_folder} to org/m failed: ValueError: Invalid metadata in README.md.")
    assert '"base_model" with value "base" is not valid' in message
    assert message.endswith("Fix the front matter of README.md (for example base_model entries) and push again.")
    assert not any("/commit/" in request.path for request in state.requests)
