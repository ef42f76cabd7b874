"""A recording fake of the Hub client and tiny merged folders for the publishing tests."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import huggingface_hub.constants
import pytest
from huggingface_hub.utils import filter_repo_objects

from mergekit_ext.engine import MergeOptions, run_recipe
from mergekit_ext.recipe import parse_recipe
from mergekit_ext.tiny import write_tiny_checkpoint

# Recognizable so that a leak in any output or log is easy to find.
FAKE_TOKEN = "hf_FAKEtokenNEVERprintMe0123456789"


class FakeHubClient:
    """Records every call of the `HubClient` protocol; `fail_on` makes one method raise."""

    def __init__(self, fail_on: str | None = None, error_text: str = "") -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.fail_on = fail_on
        self.error_text = error_text

    def _record(self, method: str, **kwargs: Any) -> None:
        self.calls.append((method, kwargs))
        if method == self.fail_on:
            raise RuntimeError(self.error_text)

    def create_repo(self, repo_id: str, *, token: str | None, private: bool | None, exist_ok: bool) -> str:
        self._record("create_repo", repo_id=repo_id, token=token, private=private, exist_ok=exist_ok)
        return f"https://huggingface.co/{repo_id}"

    def create_branch(self, repo_id: str, *, branch: str, token: str | None, exist_ok: bool) -> None:
        self._record("create_branch", repo_id=repo_id, branch=branch, token=token, exist_ok=exist_ok)

    def upload_folder(self, **kwargs: Any) -> None:
        # Apply the patterns with huggingface_hub's own filter to get the files upload_folder sends.
        folder = Path(kwargs["folder_path"])
        every_file = [path.relative_to(folder).as_posix() for path in folder.rglob("*") if path.is_file()]
        sent = sorted(filter_repo_objects(every_file, allow_patterns=kwargs["allow_patterns"]))
        self._record("upload_folder", sent_files=sent, **kwargs)

    def upload_file(self, **kwargs: Any) -> None:
        self._record("upload_file", **kwargs)

    def methods(self) -> list[str]:
        return [method for method, _ in self.calls]


@pytest.fixture
def fake_client() -> FakeHubClient:
    return FakeHubClient()


@pytest.fixture
def failing_client() -> Any:
    """Return a factory of fake clients whose method `fail_on` raises with `error_text`."""
    return FakeHubClient


@pytest.fixture
def fake_token() -> str:
    return FAKE_TOKEN


@pytest.fixture(autouse=True)
def isolated_hub_environment(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Hide any real token: no token variables and a login cache file that does not exist.

    Returns the path of that login cache file. huggingface_hub reads HF_HOME when it is
    imported, so the cache path is patched in its constants instead.
    """
    for variable in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(variable, raising=False)
    token_path = tmp_path_factory.mktemp("hf_home") / "token"
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(token_path))
    return token_path


@pytest.fixture(autouse=True)
def restore_package_logger() -> Any:
    """Undo the CLI's logging set-up (a rich handler, no propagation) after each test."""
    package_logger = logging.getLogger("mergekit_ext")
    saved = (package_logger.propagate, list(package_logger.handlers), package_logger.level)
    yield
    package_logger.propagate, package_logger.handlers[:], level = saved[0], saved[1], saved[2]
    package_logger.setLevel(level)


@pytest.fixture(scope="session")
def tiny_inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with tiny Llama checkpoints `base`, `a` and `b`; `base` has a card with a license."""
    root = tmp_path_factory.mktemp("inputs")
    write_tiny_checkpoint(root / "base", seed=0)
    write_tiny_checkpoint(root / "a", seed=1)
    write_tiny_checkpoint(root / "b", seed=2)
    (root / "base" / "README.md").write_text("---\nlicense: apache-2.0\n---\n# base\n", encoding="utf-8")
    return root


@pytest.fixture(scope="session")
def merged_folder(tiny_inputs: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The output of a real TIES merge of the tiny inputs (card, config, weights, recipe)."""
    recipe = parse_recipe(
        {
            "merge_method": "ties",
            "base_model": str(tiny_inputs / "base"),
            "models": [{"model": str(tiny_inputs / "a")}, {"model": str(tiny_inputs / "b")}],
            "parameters": {"density": 0.5},
        },
        source="test",
    )
    output = tmp_path_factory.mktemp("merged") / "ties-merge"
    run_recipe(recipe, MergeOptions(output=output, seed=3))
    return output

