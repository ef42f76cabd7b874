"""`merge push` and `push_folder` against a recording fake of the Hub client (no network)."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from mergekit_ext import hub
from mergekit_ext.cli.main import cli
from mergekit_ext.hub import PublishError, plan_upload, push_folder

MERGED_FILES = ["README.md", "config.json", "merge_recipe.yaml", "model.safetensors", "tokenizer_config.json"]


def sizes(folder: Path) -> dict[str, int]:
    return {name: (folder / name).stat().st_size for name in MERGED_FILES}


def test_plan_lists_files_with_sizes(merged_folder: Path) -> None:
    plan = plan_upload(merged_folder, "org/ties-merge")
    assert [(item.path, item.size) for item in plan.files] == sorted(sizes(merged_folder).items())
    assert plan.total_bytes == sum(sizes(merged_folder).values())


def test_plan_skips_hidden_files(merged_folder: Path, tmp_path: Path) -> None:
    folder = shutil.copytree(merged_folder, tmp_path / "out")
    (folder / ".cache" / "huggingface").mkdir(parents=True)
    (folder / ".cache" / "huggingface" / "x.lock").write_text("")
    (folder / ".DS_Store").write_text("")
    assert [item.path for item in plan_upload(folder, "org/m").files] == MERGED_FILES


def test_push_calls(merged_folder: Path, fake_client, fake_token: str) -> None:
    plan = plan_upload(merged_folder, "org/ties-merge", private=True, commit_message="first")
    url = push_folder(plan, token=fake_token, client=fake_client)

    assert url == "https://huggingface.co/org/ties-merge"
    assert fake_client.methods() == ["create_repo", "upload_folder"]
    assert fake_client.calls[0][1] == {"repo_id": "org/ties-merge", "token": fake_token, "private": True, "exist_ok": True}
    upload = fake_client.calls[1][1]
    assert upload["repo_id"] == "org/ties-merge"
    assert upload["folder_path"] == merged_folder
    assert upload["revision"] == "main"
    assert upload["commit_message"] == "first"
    assert upload["token"] == fake_token
    assert upload["sent_files"] == MERGED_FILES
    assert upload["delete_patterns"] == ["*.safetensors", "*.safetensors.index.json"]


def test_push_new_branch(merged_folder: Path, fake_client, fake_token: str) -> None:
    plan = plan_upload(merged_folder, "org/ties-merge", revision="v2")
    assert push_folder(plan, token=fake_token, client=fake_client) == "https://huggingface.co/org/ties-merge/tree/v2"
    assert fake_client.methods() == ["create_repo", "create_branch", "upload_folder"]
    assert fake_client.calls[1][1] == {"repo_id": "org/ties-merge", "branch": "v2", "token": fake_token, "exist_ok": True}
    assert fake_client.calls[2][1]["revision"] == "v2"


def test_push_token_from_environment(merged_folder: Path, fake_client, fake_token: str, monkeypatch) -> None:
    monkeypatch.setenv("HF_TOKEN", fake_token)
    push_folder(plan_upload(merged_folder, "org/m"), client=fake_client)
    assert fake_client.calls[0][1]["token"] == fake_token


def test_glob_characters_in_file_names(merged_folder: Path, tmp_path: Path, fake_client, fake_token: str) -> None:
    folder = shutil.copytree(merged_folder, tmp_path / "out")
    (folder / "notes[1].txt").write_text("x")
    push_folder(plan_upload(folder, "org/m"), token=fake_token, client=fake_client)
    assert fake_client.calls[1][1]["sent_files"] == sorted([*MERGED_FILES, "notes[1].txt"])


def test_token_from_login_cache(isolated_hub_environment: Path, fake_token: str) -> None:
    isolated_hub_environment.write_text(fake_token)
    assert hub.resolve_token() == fake_token


def test_missing_token_message(merged_folder: Path, fake_client) -> None:
    with pytest.raises(PublishError, match="no Hugging Face access token found: set the HF_TOKEN environment variable"):
        push_folder(plan_upload(merged_folder, "org/m"), client=fake_client)
    assert fake_client.calls == []


def test_rejects_folder_without_card(merged_folder: Path, tmp_path: Path) -> None:
    folder = shutil.copytree(merged_folder, tmp_path / "out")
    (folder / "README.md").unlink()
    with pytest.raises(PublishError, match=r"has no model card \(README.md\)"):
        plan_upload(folder, "org/m")


def test_rejects_card_without_front_matter(merged_folder: Path, tmp_path: Path) -> None:
    folder = shutil.copytree(merged_folder, tmp_path / "out")
    (folder / "README.md").write_text("# just a title\n")
    with pytest.raises(PublishError, match="has no valid YAML front matter"):
        plan_upload(folder, "org/m")


def test_rejects_folder_without_weights(merged_folder: Path, tmp_path: Path) -> None:
    folder = shutil.copytree(merged_folder, tmp_path / "out")
    (folder / "model.safetensors").unlink()
    with pytest.raises(PublishError, match="contains no weight files"):
        plan_upload(folder, "org/m")


def test_rejects_missing_shard(merged_folder: Path, tmp_path: Path) -> None:
    folder = shutil.copytree(merged_folder, tmp_path / "out")
    index = {"metadata": {}, "weight_map": {"x": "model.safetensors", "y": "model-00002-of-00002.safetensors"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(PublishError, match="lists shards missing from the folder: model-00002-of-00002.safetensors"):
        plan_upload(folder, "org/m")


def test_rejects_oversized_file(merged_folder: Path) -> None:
    weights = (merged_folder / "model.safetensors").stat().st_size
    with pytest.raises(PublishError, match=r"model.safetensors \(27.04 kB\); rerun the merge with a smaller --shard-size"):
        plan_upload(merged_folder, "org/m", max_file_bytes=weights - 1)
    # At exactly the limit the file is accepted.
    assert plan_upload(merged_folder, "org/m", max_file_bytes=weights).files


def test_hub_limit_constant() -> None:
    # 500 GB per file, in decimal units as the Hub states it.
    assert hub.HUB_MAX_FILE_BYTES == 500_000_000_000


def test_rejects_invalid_repo_id(merged_folder: Path) -> None:
    with pytest.raises(PublishError, match="invalid repo id 'no-namespace'"):
        plan_upload(merged_folder, "no-namespace")


def test_local_path_warning(merged_folder: Path, tmp_path: Path, caplog) -> None:
    folder = shutil.copytree(merged_folder, tmp_path / "out")
    (folder / "merge_recipe.yaml").write_text(f"base_model: {tmp_path}/models/base\n")
    with caplog.at_level(logging.WARNING, logger="mergekit_ext"):
        plan_upload(folder, "org/m")
    assert f"merge_recipe.yaml contains the local path {tmp_path}" in caplog.text


def test_token_not_in_logs(merged_folder: Path, fake_client, fake_token: str, caplog, capsys) -> None:
    with caplog.at_level(logging.DEBUG, logger="mergekit_ext"):
        push_folder(plan_upload(merged_folder, "org/m"), token=fake_token, client=fake_client)
    assert "Uploading 5 files" in caplog.text  # the log was captured
    assert fake_token not in caplog.text
    captured = capsys.readouterr()
    assert fake_token not in captured.out + captured.err


def test_token_scrubbed_from_client_error(merged_folder: Path, failing_client, fake_token: str, caplog) -> None:
    client = failing_client("upload_folder", f"401 Unauthorized: Authorization: Bearer {fake_token}")
    with caplog.at_level(logging.DEBUG, logger="mergekit_ext"), pytest.raises(PublishError) as raised:
        push_folder(plan_upload(merged_folder, "org/m"), token=fake_token, client=client)
    message = str(raised.value)
    assert message == "uploading {} to org/m failed: RuntimeError: 401 Unauthorized: Authorization: Bearer ***".format(
        merged_folder
    )
    assert raised.value.__cause__ is None
    assert raised.value.__suppress_context__
    assert fake_token not in caplog.text


def run_cli(arguments: list[str], **environment: str):
    return CliRunner().invoke(cli, arguments, env=environment, catch_exceptions=False)


def test_cli_dry_run_lists_files(merged_folder: Path, monkeypatch) -> None:
    def no_client() -> None:
        raise AssertionError("a dry run must not create a client")

    monkeypatch.setattr(hub, "default_client", no_client)
    result = run_cli(["push", str(merged_folder), "--repo-id", "org/ties-merge", "--dry-run"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    total = sum(sizes(merged_folder).values())
    assert lines[0].startswith(f"Dry run: would upload 5 files, {hub.format_bytes(total)} ({total:,} bytes), to org/ties-merge")
    listed = {line.split()[-1]: int(line.split()[0].replace(",", "")) for line in lines[1:]}
    assert listed == sizes(merged_folder)


def test_cli_push(merged_folder: Path, fake_client, fake_token: str, monkeypatch) -> None:
    monkeypatch.setattr(hub, "default_client", lambda: fake_client)
    result = run_cli(
        ["push", str(merged_folder), "--repo-id", "org/m", "--private", "--revision", "dev", "--commit-message", "hello"],
        HF_TOKEN=fake_token,
    )
    assert result.exit_code == 0, result.output
    assert result.stdout.strip().startswith("Pushed 5 files")
    assert result.stdout.strip().endswith("to https://huggingface.co/org/m/tree/dev")
    assert fake_client.methods() == ["create_repo", "create_branch", "upload_folder"]
    assert fake_client.calls[0][1]["private"] is True
    assert fake_client.calls[2][1]["commit_message"] == "hello"
    assert fake_token not in result.output


def test_cli_missing_token(merged_folder: Path, fake_client, monkeypatch) -> None:
    monkeypatch.setattr(hub, "default_client", lambda: fake_client)
    result = run_cli(["push", str(merged_folder), "--repo-id", "org/m"])
    assert result.exit_code == 2
    assert "Error: no Hugging Face access token found" in result.stderr
    assert fake_client.calls == []


def test_cli_client_error_hides_token(merged_folder: Path, failing_client, fake_token: str, monkeypatch) -> None:
    monkeypatch.setattr(hub, "default_client", lambda: failing_client("create_repo", f"bad token {fake_token}"))
    result = run_cli(["push", str(merged_folder), "--repo-id", "org/m"], HF_TOKEN=fake_token)
    assert result.exit_code == 2
    assert "Error: creating repo org/m failed: RuntimeError: bad token ***" in result.stderr
    assert fake_token not in result.output
