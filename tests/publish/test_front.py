"""`push_front`: every Pareto-front member to the Hub, as repos or as branches, plus a summary card."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from mergekit_ext.checkpoint.card import EvoFront, EvoMember
from mergekit_ext.hub import PublishError, member_targets, push_front

FILES = ["README.md", "config.json", "merge_recipe.yaml", "model.safetensors", "tokenizer_config.json"]


@pytest.fixture
def member_dirs(merged_folder: Path, tmp_path: Path) -> list[Path]:
    return [shutil.copytree(merged_folder, tmp_path / "front" / f"member_{index}") for index in range(3)]


def example_front() -> EvoFront:
    return EvoFront(
        run_name="l2s",
        members=[
            EvoMember(index, {"weight": weight}, {"accuracy": accuracy, "mean_tokens": tokens})
            for index, (weight, accuracy, tokens) in enumerate([(0.2, 0.6, 3000.0), (0.5, 0.55, 2000.0), (0.8, 0.4, 900.0)])
        ],
        objective_goals={"accuracy": "max", "mean_tokens": "min"},
    )


def test_member_targets() -> None:
    assert member_targets("org/l2s", 2, "repos") == [("org/l2s-member-00", "main"), ("org/l2s-member-01", "main")]
    assert member_targets("org/l2s", 2, "branches") == [("org/l2s", "member-00"), ("org/l2s", "member-01")]
    with pytest.raises(PublishError, match="unknown layout 'tags'"):
        member_targets("org/l2s", 2, "tags")  # type: ignore[arg-type]


def test_repos_layout_calls(member_dirs: list[Path], fake_client, fake_token: str) -> None:
    plan = push_front(member_dirs, "org/l2s", "repos", fake_client, token=fake_token, front=example_front())

    creates = [kwargs["repo_id"] for method, kwargs in fake_client.calls if method == "create_repo"]
    assert creates == ["org/l2s", "org/l2s-member-00", "org/l2s-member-01", "org/l2s-member-02"]
    uploads = [kwargs for method, kwargs in fake_client.calls if method == "upload_folder"]
    assert [(u["repo_id"], u["revision"], u["folder_path"]) for u in uploads] == [
        (f"org/l2s-member-{index:02d}", "main", member_dirs[index]) for index in range(3)
    ]
    assert all(u["sent_files"] == FILES for u in uploads)
    assert "create_branch" not in fake_client.methods()
    assert fake_client.methods()[-1] == "upload_file"

    summary = fake_client.calls[-1][1]
    assert (summary["repo_id"], summary["revision"], summary["path_in_repo"]) == ("org/l2s", "main", "README.md")
    markdown = summary["path_or_fileobj"].decode("utf-8")
    assert markdown == plan.summary_card
    for index in range(3):
        assert f"[{index}](https://huggingface.co/org/l2s-member-{index:02d})" in markdown
    assert "| [1](https://huggingface.co/org/l2s-member-01) | 0.55 | 2000 | 0.5 |" in markdown
    # Inputs default to the base_model entries of the first member's card.
    front_matter = yaml.safe_load(markdown.split("---\n")[1])
    assert front_matter["base_model"] == ["base", "a", "b"]


def test_branches_layout_calls(member_dirs: list[Path], fake_client, fake_token: str) -> None:
    push_front(member_dirs, "org/l2s", "branches", fake_client, token=fake_token, private=True)

    assert fake_client.methods() == ["create_repo"] + ["create_branch", "upload_folder"] * 3 + ["upload_file"]
    assert fake_client.calls[0][1] == {"repo_id": "org/l2s", "token": fake_token, "private": True, "exist_ok": True}
    branches = [kwargs["branch"] for method, kwargs in fake_client.calls if method == "create_branch"]
    assert branches == ["member-00", "member-01", "member-02"]
    uploads = [kwargs for method, kwargs in fake_client.calls if method == "upload_folder"]
    assert [(u["repo_id"], u["revision"]) for u in uploads] == [("org/l2s", f"member-{i:02d}") for i in range(3)]
    markdown = fake_client.calls[-1][1]["path_or_fileobj"].decode("utf-8")
    for index in range(3):
        assert f"[{index}](https://huggingface.co/org/l2s/tree/member-{index:02d})" in markdown


def test_front_dry_run_sends_nothing(member_dirs: list[Path], fake_client) -> None:
    plan = push_front(member_dirs, "org/l2s", "branches", fake_client, dry_run=True)
    assert fake_client.calls == []
    text = plan.describe()
    assert "Member 2: 5 files" in text
    assert "to org/l2s (branch member-02" in text
    assert "Summary card: README.md" in text
    assert "to org/l2s (branch main)" in text


def test_front_checks_every_folder_first(member_dirs: list[Path], fake_client, fake_token: str) -> None:
    (member_dirs[2] / "README.md").unlink()
    with pytest.raises(PublishError, match="member_2 has no model card"):
        push_front(member_dirs, "org/l2s", "repos", fake_client, token=fake_token)
    assert fake_client.calls == []


def test_front_member_count_mismatch(member_dirs: list[Path], fake_client, fake_token: str) -> None:
    with pytest.raises(PublishError, match="the front has 3 members but 2 folders were given"):
        push_front(member_dirs[:2], "org/l2s", "repos", fake_client, token=fake_token, front=example_front())


def test_front_missing_token(member_dirs: list[Path], fake_client) -> None:
    with pytest.raises(PublishError, match="no Hugging Face access token found"):
        push_front(member_dirs, "org/l2s", "repos", fake_client)
    assert fake_client.calls == []
