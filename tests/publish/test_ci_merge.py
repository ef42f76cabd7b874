"""`scripts/ci_merge.sh`, the script the GitHub workflow runs, on the tiny recipes of `configs/ci/`.

The no-token path runs the real `merge` command (merges and `merge push --dry-run`). The
push path puts a stand-in `merge` first on PATH that records its arguments, because a real
push needs the Hub. test_push.py tests `merge push` itself against a fake client.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from mergekit_ext.tiny import write_tiny_checkpoint

REPOSITORY = Path(__file__).resolve().parents[2]
SCRIPT = REPOSITORY / "scripts" / "ci_merge.sh"
RECIPES = REPOSITORY / "configs" / "ci"
WORKFLOW = REPOSITORY / ".github" / "workflows" / "merge.yml"
FAKE_TOKEN = "hf_FAKEtokenNEVERprintMe0123456789"

# A stand-in for `merge`: appends its arguments and whether HF_TOKEN is set to $MERGE_CALLS,
# creates the output folder of `merge run`, and fails `merge push` when $FAIL_PUSH is set.
STAND_IN = """#!/usr/bin/env bash
echo "$* | token=${HF_TOKEN:+set}" >> "$MERGE_CALLS"
if [[ $1 == run ]]; then mkdir -p "$4"; fi
if [[ $1 == push && -n ${FAIL_PUSH:-} ]]; then exit 1; fi
exit 0
"""


def base_environment(tmp_path: Path) -> dict[str, str]:
    environment = {key: value for key, value in os.environ.items() if not key.startswith(("HF_", "HUB_", "GITHUB_"))}
    environment.pop("HUGGING_FACE_HUB_TOKEN", None)
    environment["HF_HOME"] = str(tmp_path / "hf_home")
    environment["HF_HUB_OFFLINE"] = "1"
    environment["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{environment['PATH']}"
    return environment


def run_script(arguments: list[str], cwd: Path, environment: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["/bin/bash", str(SCRIPT), *arguments], cwd=cwd, env=environment, capture_output=True, text=True, timeout=300
    )


@pytest.fixture
def stand_in(tmp_path: Path) -> tuple[dict[str, str], Path]:
    folder = tmp_path / "stand_in_bin"
    folder.mkdir()
    (folder / "merge").write_text(STAND_IN)
    (folder / "merge").chmod(0o755)
    calls = tmp_path / "calls.txt"
    environment = base_environment(tmp_path)
    environment["PATH"] = f"{folder}{os.pathsep}/usr/bin{os.pathsep}/bin"
    environment["MERGE_CALLS"] = str(calls)
    return environment, calls


def test_merges_and_checks_without_token(tmp_path: Path) -> None:
    work = tmp_path / "work"
    a = write_tiny_checkpoint(work / "models" / "a", seed=1)
    b = write_tiny_checkpoint(work / "models" / "b", seed=2)
    write_tiny_checkpoint(work / "models" / "base", seed=0)

    result = run_script([str(RECIPES), "merged"], work, base_environment(tmp_path))

    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("HF_TOKEN not set: checking") == 2
    assert "would upload 5 files" in result.stdout
    assert "to local/linear (branch main" in result.stdout
    assert "to local/ties (branch main" in result.stdout
    assert result.stdout.strip().endswith("merged 2 recipes into merged")
    for name, method in (("linear", "linear"), ("ties", "ties")):
        card = (work / "merged" / name / "README.md").read_text()
        assert f"- **Method:** `{method}`" in card
    # linear.yaml: weights 0.25 and 0.75, normalized by their sum 1.
    merged = load_file(work / "merged" / "linear" / "model.safetensors")
    first, second = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    name = "model.layers.0.mlp.up_proj.weight"
    torch.testing.assert_close(merged[name], 0.25 * first[name] + 0.75 * second[name])


def test_pushes_with_token(tmp_path: Path, stand_in: tuple[dict[str, str], Path]) -> None:
    environment, calls = stand_in
    environment.update(HF_TOKEN=FAKE_TOKEN, HUB_REPO_PREFIX="org/ci-", HUB_REVISION="nightly", HUB_PRIVATE="true", GITHUB_SHA="abc123")

    result = run_script([str(RECIPES), "out"], tmp_path, environment)

    assert result.returncode == 0, result.stderr
    assert calls.read_text().splitlines() == [
        f"run {RECIPES}/linear.yaml --output out/linear --force | token=set",
        f"run {RECIPES}/ties.yaml --output out/ties --force | token=set",
        "push out/linear --repo-id org/ci-linear --revision nightly --private --commit-message CI merge of linear at abc123 | token=set",
        "push out/ties --repo-id org/ci-ties --revision nightly --private --commit-message CI merge of ties at abc123 | token=set",
    ]
    assert FAKE_TOKEN not in result.stdout + result.stderr


def test_dry_run_without_token(tmp_path: Path, stand_in: tuple[dict[str, str], Path]) -> None:
    environment, calls = stand_in
    environment.update(HF_TOKEN="", HUB_REPO_PREFIX="org/ci-")  # an unset secret arrives empty
    result = run_script([str(RECIPES), "out"], tmp_path, environment)
    assert result.returncode == 0, result.stderr
    pushes = [line for line in calls.read_text().splitlines() if line.startswith("push")]
    assert pushes == [
        "push out/linear --repo-id org/ci-linear --revision main --dry-run | token=",
        "push out/ties --repo-id org/ci-ties --revision main --dry-run | token=",
    ]


def test_token_without_prefix(tmp_path: Path, stand_in: tuple[dict[str, str], Path]) -> None:
    environment, calls = stand_in
    environment["HF_TOKEN"] = FAKE_TOKEN
    result = run_script([str(RECIPES), "out"], tmp_path, environment)
    assert result.returncode == 2
    assert "HF_TOKEN is set but HUB_REPO_PREFIX is not" in result.stderr
    assert FAKE_TOKEN not in result.stdout + result.stderr
    assert not calls.exists()


def test_failed_push_fails_script(tmp_path: Path, stand_in: tuple[dict[str, str], Path]) -> None:
    environment, _ = stand_in
    environment.update(HF_TOKEN=FAKE_TOKEN, HUB_REPO_PREFIX="org/", FAIL_PUSH="1")
    result = run_script([str(RECIPES), "out"], tmp_path, environment)
    assert result.returncode == 1
    assert "push of 'out/linear' to org/linear failed" in result.stderr


def test_empty_recipe_folder(tmp_path: Path, stand_in: tuple[dict[str, str], Path]) -> None:
    environment, calls = stand_in
    (tmp_path / "recipes").mkdir()
    result = run_script(["recipes", "out"], tmp_path, environment)
    assert result.returncode == 0
    assert "no recipes (*.yaml, *.yml) in 'recipes'; nothing to merge" in result.stdout
    assert not calls.exists()


def test_merge_not_on_path(tmp_path: Path) -> None:
    environment = base_environment(tmp_path)
    environment["PATH"] = f"/usr/bin{os.pathsep}/bin"
    result = run_script([str(RECIPES), "out"], tmp_path, environment)
    assert result.returncode == 127
    assert "the 'merge' command is not on PATH" in result.stderr


def test_usage_errors(tmp_path: Path, stand_in: tuple[dict[str, str], Path]) -> None:
    environment, _ = stand_in
    assert run_script([str(RECIPES)], tmp_path, environment).returncode == 2
    missing = run_script(["no_such_folder", "out"], tmp_path, environment)
    assert missing.returncode == 2
    assert "recipe folder 'no_such_folder' not found" in missing.stderr
    (tmp_path / "bad").mkdir()
    shutil.copy(RECIPES / "ties.yaml", tmp_path / "bad" / "my recipe.yaml")
    bad_name = run_script(["bad", "out"], tmp_path, environment)
    assert bad_name.returncode == 2
    assert "recipe file name 'my recipe.yaml' cannot name a repo" in bad_name.stderr


def test_workflow_runs_the_script() -> None:
    workflow = yaml.safe_load(WORKFLOW.read_text())
    triggers = workflow[True]  # YAML 1.1 reads the key "on" as true
    assert set(triggers) == {"push", "workflow_dispatch"}
    steps = workflow["jobs"]["merge"]["steps"]
    merge_step = next(step for step in steps if step.get("name") == "Merge")
    assert merge_step["run"] == 'bash scripts/ci_merge.sh "$RECIPES_DIR" "$OUTPUT_DIR"'
    assert merge_step["env"]["HF_TOKEN"] == "${{ secrets.HF_TOKEN }}"
    upload = next(step for step in steps if step.get("uses", "").startswith("actions/upload-artifact"))
    assert upload["with"]["path"] == "${{ env.OUTPUT_DIR }}/"
    assert upload["if"] == "always()"
