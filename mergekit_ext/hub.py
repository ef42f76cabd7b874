"""Publishing output folders to the Hugging Face Hub.

`plan_upload` checks a folder (model card, weights, file sizes, shard index) and lists
exactly the files an upload sends. `push_folder` sends them with huggingface_hub:
`create_repo`, `create_branch` for a new revision, then `upload_folder`. `push_front`
publishes every member of an Evo-L2S Pareto front, as one repo each or as branches of
one repo, plus a summary card linking them.

The access token comes from the argument, the `HF_TOKEN` environment variable or the
huggingface_hub login cache (`huggingface_hub.get_token`). It is passed to the client
and never logged; messages of client errors are scrubbed of it before they are raised.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from mergekit_ext.checkpoint.card import (
    CardInput,
    EvoFront,
    EvoMember,
    format_bytes,
    front_summary_card,
    is_repo_id,
    read_front_matter,
)
from mergekit_ext.errors import MergekitExtError

logger = logging.getLogger(__name__)

# Hard limit of the Hub on one file: "no single file will exceed 500GB", with files
# under 200GB recommended (https://huggingface.co/docs/hub/storage-limits, section
# "Repository limitations and recommendations", read in the huggingface/hub-docs
# revision 003e04e). The Hub counts GB as 10^9 bytes.
HUB_MAX_FILE_BYTES = 500 * 1000**3
HUB_RECOMMENDED_FILE_BYTES = 200 * 1000**3

TOKEN_VARIABLE = "HF_TOKEN"
CARD_NAME = "README.md"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
SAFETENSORS_INDEX = "model.safetensors.index.json"
TEXT_SUFFIXES = (".md", ".yaml", ".yml", ".json", ".txt")
TEXT_SCAN_BYTES = 1_000_000  # text files larger than this (tokenizer.json) are not scanned for local paths
# Remote files of these patterns that an upload does not replace are deleted in the same
# commit, so that a re-push with another shard count leaves no stale shards behind.
STALE_WEIGHT_PATTERNS = ["*.safetensors", "*.safetensors.index.json"]

Layout = Literal["repos", "branches"]


class PublishError(MergekitExtError):
    """A folder cannot be published, no token is available, or the Hub rejected a request."""


class HubClient(Protocol):
    """The part of `huggingface_hub.HfApi` that publishing uses (a fake in tests)."""

    def create_repo(self, repo_id: str, *, token: str | None, private: bool | None, exist_ok: bool) -> Any: ...

    def create_branch(self, repo_id: str, *, branch: str, token: str | None, exist_ok: bool) -> Any: ...

    def upload_folder(
        self,
        *,
        repo_id: str,
        folder_path: str | Path,
        commit_message: str | None,
        token: str | None,
        revision: str | None,
        allow_patterns: list[str] | None,
        delete_patterns: list[str] | None,
    ) -> Any: ...

    def upload_file(
        self,
        *,
        path_or_fileobj: bytes,
        path_in_repo: str,
        repo_id: str,
        token: str | None,
        revision: str | None,
        commit_message: str | None,
    ) -> Any: ...


def default_client() -> HubClient:
    """Return a `huggingface_hub.HfApi` (imported here so that `merge --help` stays fast)."""
    from huggingface_hub import HfApi

    return HfApi()


def resolve_token(token: str | None = None) -> str:
    """Return `token`, else the one in `HF_TOKEN` or the huggingface_hub login cache."""
    if token:
        return token
    from huggingface_hub import get_token

    found = get_token()
    if not found:
        raise PublishError(
            f"no Hugging Face access token found: set the {TOKEN_VARIABLE} environment variable or run "
            "`hf auth login` (a token with write access); --dry-run needs no token"
        )
    return found


@dataclass(frozen=True)
class UploadFile:
    """A file an upload sends: its path inside the folder (POSIX form) and size in bytes."""

    path: str
    size: int


@dataclass
class UploadPlan:
    """Files, target repo and branch of one upload; `describe` lists them for a dry run."""

    folder: Path
    repo_id: str
    files: list[UploadFile]
    revision: str = "main"
    private: bool = False
    commit_message: str = "Upload model with mergekit-ext"

    @property
    def total_bytes(self) -> int:
        return sum(item.size for item in self.files)

    @property
    def url(self) -> str:
        base = f"https://huggingface.co/{self.repo_id}"
        return base if self.revision == "main" else f"{base}/tree/{self.revision}"

    def describe(self) -> str:
        """Return the list of files with sizes, as a dry run prints it."""
        visibility = "private" if self.private else "public"
        lines = [
            f"{len(self.files)} files, {format_bytes(self.total_bytes)} ({self.total_bytes:,} bytes), "
            f"to {self.repo_id} (branch {self.revision}, {visibility} if created):"
        ]
        lines += [f"{item.size:>16,} B  {item.path}" for item in self.files]
        return "\n".join(lines)


@dataclass
class FrontPushPlan:
    """Every upload of a front export: one plan per member and the summary card."""

    summary_repo_id: str
    summary_card: str
    members: list[UploadPlan] = field(default_factory=list)
    layout: Layout = "repos"

    def describe(self) -> str:
        """Return every member's file list and where the summary card goes."""
        parts = [f"Member {index}: {plan.describe()}" for index, plan in enumerate(self.members)]
        parts.append(
            f"Summary card: README.md ({len(self.summary_card.encode('utf-8')):,} B) to "
            f"{self.summary_repo_id} (branch main)"
        )
        return "\n\n".join(parts)


def plan_upload(
    folder: str | Path,
    repo_id: str,
    *,
    revision: str = "main",
    private: bool = False,
    commit_message: str | None = None,
    max_file_bytes: int = HUB_MAX_FILE_BYTES,
) -> UploadPlan:
    """Check that `folder` can be published to `repo_id` and list the files an upload sends.

    Raises `PublishError` when the repo id is malformed, the folder lacks a model card
    (README.md with front matter) or weights, a shard listed in the index is missing, or
    a file is larger than `max_file_bytes` (the Hub's single-file limit).
    """
    folder = Path(folder)
    if not is_repo_id(repo_id):
        raise PublishError(f"invalid repo id {repo_id!r}: use ORG/NAME, for example my-org/my-merge")
    if not folder.is_dir():
        raise PublishError(f"{folder}: folder not found; give the output folder of a merge")

    files = _list_files(folder)
    _check_card(folder)
    _warn_local_paths(folder, files)
    _check_weights(folder, files)
    _check_sizes(folder, files, max_file_bytes)
    return UploadPlan(
        folder=folder,
        repo_id=repo_id,
        files=files,
        revision=revision,
        private=private,
        commit_message=commit_message or f"Upload {folder.name} with mergekit-ext",
    )


def _list_files(folder: Path) -> list[UploadFile]:
    # Hidden files and folders (.git, .DS_Store, .cache/huggingface of a local download)
    # stay local. upload_folder itself skips only .git and .cache/huggingface.
    files = []
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder)
        if any(part.startswith(".") for part in relative.parts) or not path.is_file():
            continue
        files.append(UploadFile(relative.as_posix(), path.stat().st_size))
    return files


def _check_card(folder: Path) -> None:
    readme = folder / CARD_NAME
    if not readme.is_file():
        raise PublishError(
            f"{folder} has no model card ({CARD_NAME}); merge commands write one, or add a README.md "
            "with Hub metadata before pushing"
        )
    metadata = read_front_matter(readme)
    if metadata is None:
        raise PublishError(
            f"{readme} has no valid YAML front matter (the block between '---' lines that contains "
            "base_model, tags and license); add it before pushing"
        )
    local_names = [str(entry) for entry in _as_list(metadata.get("base_model")) if not is_repo_id(str(entry))]
    if local_names:
        # NOTE: huggingface_hub has the Hub check the card's YAML before each commit. Whether
        # that check rejects a base_model entry naming no Hub model was not tried on the live Hub.
        logger.warning(
            "base_model entries %s in %s are not Hub repo ids (ORG/NAME), so the Hub cannot link them; "
            "replace them with the ids of the input models if they are on the Hub",
            ", ".join(local_names),
            readme,
        )


def _warn_local_paths(folder: Path, files: list[UploadFile]) -> None:
    # A recipe run with absolute model paths records them in merge_recipe.yaml; warn so that
    # the user can decide whether the paths may be published.
    local_paths = {str(folder.resolve().parent), str(Path.home())}
    for item in files:
        if not item.path.endswith(TEXT_SUFFIXES) or item.size > TEXT_SCAN_BYTES:
            continue
        text = (folder / item.path).read_text(encoding="utf-8", errors="replace")
        found = sorted(path for path in local_paths if len(path) > 1 and path in text)
        if found:
            logger.warning("%s contains the local path %s; edit the file if it must not be published", item.path, found[0])


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    return list(value) if isinstance(value, list) else [value]


def _check_weights(folder: Path, files: list[UploadFile]) -> None:
    if not any(item.path.endswith(WEIGHT_SUFFIXES) for item in files):
        raise PublishError(
            f"{folder} contains no weight files ({', '.join(WEIGHT_SUFFIXES)}); push the output folder "
            "of a finished merge"
        )
    index_path = folder / SAFETENSORS_INDEX
    if not index_path.is_file():
        return
    try:
        weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise PublishError(f"{index_path} is not a valid shard index ({error}); rerun the merge") from error
    present = {item.path for item in files}
    missing = sorted(set(weight_map.values()) - present)
    if missing:
        raise PublishError(f"{index_path} lists shards missing from the folder: {', '.join(missing)}; rerun the merge")


def _check_sizes(folder: Path, files: list[UploadFile], max_file_bytes: int) -> None:
    oversized = [item for item in files if item.size > max_file_bytes]
    if oversized:
        listed = ", ".join(f"{item.path} ({format_bytes(item.size)})" for item in oversized)
        raise PublishError(
            f"{folder}: files larger than the Hub's single-file limit of {format_bytes(max_file_bytes)}: "
            f"{listed}; rerun the merge with a smaller --shard-size (for example --shard-size 5GB)"
        )
    for item in files:
        if item.size > HUB_RECOMMENDED_FILE_BYTES:
            logger.warning(
                "%s is %s, above the %s per file the Hub recommends; a smaller --shard-size uploads more reliably",
                item.path,
                format_bytes(item.size),
                format_bytes(HUB_RECOMMENDED_FILE_BYTES),
            )


def push_folder(plan: UploadPlan, *, token: str | None = None, client: HubClient | None = None) -> str:
    """Create the repo (and branch) if needed, upload the planned files and return the repo's address."""
    token = resolve_token(token)
    client = client or default_client()
    _call(token, f"creating repo {plan.repo_id}", client.create_repo, plan.repo_id, token=token, private=plan.private, exist_ok=True)
    _upload(client, plan, token)
    return plan.url


def _upload(client: HubClient, plan: UploadPlan, token: str) -> None:
    if plan.revision != "main":
        _call(
            token,
            f"creating branch {plan.revision} in {plan.repo_id}",
            client.create_branch,
            plan.repo_id,
            branch=plan.revision,
            token=token,
            exist_ok=True,
        )
    logger.info(
        "Uploading %d files (%s) from %s to %s", len(plan.files), format_bytes(plan.total_bytes), plan.folder, plan.url
    )
    _call(
        token,
        f"uploading {plan.folder} to {plan.repo_id}",
        client.upload_folder,
        repo_id=plan.repo_id,
        folder_path=plan.folder,
        commit_message=plan.commit_message,
        token=token,
        revision=plan.revision,
        allow_patterns=[glob.escape(item.path) for item in plan.files],
        delete_patterns=list(STALE_WEIGHT_PATTERNS),
    )
    logger.info("Uploaded %s", plan.url)


def _call(secret: str, action: str, function: Any, /, *args: Any, **kwargs: Any) -> Any:
    try:
        return function(*args, **kwargs)
    except Exception as error:  # noqa: BLE001 - any client failure (HTTP, network, validation) ends the push
        # The message of an HTTP error can echo request details, so the token is replaced.
        # Raising without chaining keeps the original message out of any traceback.
        message = str(error).replace(secret, "***") if secret else str(error)
        if "Invalid metadata in README.md" in message:
            # huggingface_hub raises this when the Hub's YAML check rejects the card.
            message += "\nFix the front matter of README.md (for example base_model entries) and push again."
        raise PublishError(f"{action} failed: {type(error).__name__}: {message}") from None


def member_targets(prefix: str, count: int, layout: Layout) -> list[tuple[str, str]]:
    """Return (repo id, branch) of each front member for `layout`."""
    if layout == "repos":
        return [(f"{prefix}-member-{index:02d}", "main") for index in range(count)]
    if layout == "branches":
        return [(prefix, f"member-{index:02d}") for index in range(count)]
    raise PublishError(f"unknown layout {layout!r}; use 'repos' or 'branches'")


def plan_front(
    front_dirs: Sequence[str | Path],
    prefix: str,
    layout: Layout = "repos",
    *,
    front: EvoFront | None = None,
    inputs: Sequence[CardInput] | None = None,
    private: bool = False,
    commit_message: str | None = None,
    max_file_bytes: int = HUB_MAX_FILE_BYTES,
) -> FrontPushPlan:
    """Check every member folder of a front and plan its upload, with the summary card.

    `front` gives the objectives and genomes for the summary, its members in the order of
    `front_dirs`. Without it the summary lists the members by index only. `inputs` default
    to the `base_model` entries of the first member's card.
    """
    if not front_dirs:
        raise PublishError("the front has no members to push; export the front first")
    if not is_repo_id(prefix):
        raise PublishError(f"invalid repo id prefix {prefix!r}: use ORG/PREFIX, for example my-org/l2s-front")
    if front is not None and len(front.members) != len(front_dirs):
        raise PublishError(
            f"the front has {len(front.members)} members but {len(front_dirs)} folders were given; "
            "give one folder per member, in the front's order"
        )

    targets = member_targets(prefix, len(front_dirs), layout)
    plans = [
        plan_upload(
            folder,
            repo_id,
            revision=revision,
            private=private,
            commit_message=commit_message,
            max_file_bytes=max_file_bytes,
        )
        for folder, (repo_id, revision) in zip(front_dirs, targets)
    ]

    members = list(front.members) if front is not None else [EvoMember(index, {}, {}) for index in range(len(plans))]
    linked = [dataclasses.replace(member, repo_id=plan.repo_id, revision=plan.revision) for member, plan in zip(members, plans)]
    summary_front = (
        dataclasses.replace(front, members=linked)
        if front is not None
        else EvoFront(run_name=prefix.split("/")[1], members=linked)
    )
    if inputs is None:
        metadata = read_front_matter(Path(front_dirs[0]) / CARD_NAME) or {}
        inputs = [CardInput(name=str(entry), sha256="", repo_id=str(entry)) for entry in _as_list(metadata.get("base_model"))]
    card = front_summary_card(summary_front, inputs)
    return FrontPushPlan(summary_repo_id=prefix, summary_card=card, members=plans, layout=layout)


def push_front(
    front_dirs: Sequence[str | Path],
    prefix: str,
    layout: Layout = "repos",
    client: HubClient | None = None,
    *,
    token: str | None = None,
    front: EvoFront | None = None,
    inputs: Sequence[CardInput] | None = None,
    private: bool = False,
    commit_message: str | None = None,
    dry_run: bool = False,
    max_file_bytes: int = HUB_MAX_FILE_BYTES,
) -> FrontPushPlan:
    """Publish every member of a Pareto front and a summary card that links them.

    Layout `repos`: member i goes to `PREFIX-member-ii` and the summary to `PREFIX`.
    Layout `branches`: member i goes to branch `member-ii` of `PREFIX`, the summary to its
    main branch. Every folder is checked before anything is sent. With `dry_run` nothing is
    sent and no token is needed; the returned plan lists what a push would send.
    """
    plan = plan_front(
        front_dirs,
        prefix,
        layout,
        front=front,
        inputs=inputs,
        private=private,
        commit_message=commit_message,
        max_file_bytes=max_file_bytes,
    )
    if dry_run:
        return plan
    token = resolve_token(token)
    client = client or default_client()

    repo_ids = [prefix] + [member.repo_id for member in plan.members if member.repo_id != prefix]
    for repo_id in repo_ids:
        _call(token, f"creating repo {repo_id}", client.create_repo, repo_id, token=token, private=private, exist_ok=True)
    for member in plan.members:
        _upload(client, member, token)
    _call(
        token,
        f"uploading the summary card to {prefix}",
        client.upload_file,
        path_or_fileobj=plan.summary_card.encode("utf-8"),
        path_in_repo=CARD_NAME,
        repo_id=prefix,
        token=token,
        revision="main",
        commit_message=commit_message or "Upload Pareto front summary with mergekit-ext",
    )
    logger.info("Pushed %d front members to %s (layout %s)", len(plan.members), prefix, layout)
    return plan
