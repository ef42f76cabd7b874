"""Build the `text` zoo: one fine-tuned all-MiniLM-L6-v2 encoder and cosine head per task.

Per task the build runs four steps:
1. read the data and cut deterministic splits;
2. train a cosine head on frozen base embeddings (the frozen-base reference);
3. fine-tune a copy of the base encoder jointly with a copy of that head, so the
   fine-tuning starts from a fitted head (linear probe, then fine-tuning);
4. measure both on the test split.

Folder layout (`zoo.json` lists every path relative to the zoo folder):

    zoo.json                       manifest: settings, seed, build time, per-task results
    base/                          the base encoder re-saved with save_pretrained
    tasks/<task>/model/            fine-tuned encoder (config, model.safetensors, tokenizer)
    tasks/<task>/head.safetensors  head trained with the fine-tuned encoder
    tasks/<task>/head_frozen_base.safetensors
    tasks/<task>/{train,validation,test}.jsonl
    tasks/<task>/task.json         results and the settings hash that decides reuse

A task folder is rebuilt only when its settings hash changes: the training
settings, the task definition, the sizes and modification times of its data files
and the format version.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import transformers

from mergekit_ext.errors import MergekitExtError, OutputError
from mergekit_ext.models.encoder import Encoder, embed_texts, encode_batch, load_encoder, locate_minilm
from mergekit_ext.models.heads import DEFAULT_LOGIT_SCALE, CosineHead
from mergekit_ext.zoo.cache import zoo_folder
from mergekit_ext.zoo.evaluate import MANIFEST_NAME, ProgressCallback
from mergekit_ext.zoo.text_tasks import (
    DataPaths,
    Example,
    TaskSplits,
    TextTask,
    builtin_tasks,
    check_sources,
    split_examples,
    write_jsonl,
)

logger = logging.getLogger(__name__)

FORMAT_VERSION = "1"
SMALL_TASKS = ("wn-pos", "wn-lemma", "wn-verb")


@dataclass(frozen=True)
class TextZooSettings:
    """Every setting that changes the zoo's content; their hash decides cache reuse."""

    seed: int = 0
    train_size: int = 2500  # max training texts per task
    validation_size: int = 300
    test_size: int = 400
    steps: int = 200  # fine-tuning steps per task
    batch_size: int = 32
    learning_rate: float = 2e-4  # encoder, AdamW, linear warm-up then linear decay
    head_learning_rate: float = 1e-3  # prototypes during fine-tuning
    warmup_fraction: float = 0.1
    probe_steps: int = 300  # full-batch Adam steps of the frozen-base head
    probe_learning_rate: float = 1e-2
    logit_scale: float = DEFAULT_LOGIT_SCALE
    # The token embedding matrix has 11.7M of the 22.7M parameters, and a batch touches a
    # few dozen of its 30522 rows, so AdamW would spend most of a short-input step on it.
    train_token_embeddings: bool = False

    @classmethod
    def small(cls, seed: int = 0) -> TextZooSettings:
        """Return the settings of the test-sized zoo (3 tasks, few steps)."""
        return cls(
            seed=seed, train_size=400, validation_size=60, test_size=120,
            steps=60, probe_steps=150, learning_rate=2e-4,
        )  # fmt: skip


@dataclass
class TaskResult:
    """Measurements of one built task."""

    name: str
    labels: list[str]
    splits: TaskSplits
    frozen_base_accuracy: float
    finetuned_accuracy: float
    seconds: float
    cpu_seconds: float  # process CPU time, all threads


def default_zoo_dir(small: bool = False) -> Path:
    """Return the cache folder of the full or the small text zoo."""
    return zoo_folder("text-small" if small else "text", FORMAT_VERSION)


def resolve_tasks(names: Sequence[str] | None, extra: Sequence[TextTask] = (), small: bool = False) -> list[TextTask]:
    """Return the tasks to build: the named ones, or the default set plus the user tasks."""
    registry = builtin_tasks()
    for task in extra:
        registry[task.name] = task
    if not names:
        names = list(SMALL_TASKS) if small else [*builtin_tasks(), *(task.name for task in extra)]
    unknown = [name for name in names if name not in registry]
    if unknown:
        raise MergekitExtError(
            f"Unknown text task(s): {', '.join(unknown)}. Available: {', '.join(registry)}; "
            "add a task from a JSONL file with --task-file NAME=PATH."
        )
    return [registry[name] for name in dict.fromkeys(names)]


def task_settings_hash(task: TextTask, settings: TextZooSettings, paths: DataPaths, base_dir: Path) -> str:
    """Return the hash that decides whether a built task folder can be reused."""
    sources = []
    for source in check_sources(task, paths):
        stat = source.path.stat()
        sources.append([str(source.path), stat.st_size, int(stat.st_mtime)])
    base_weights = base_dir / "model.safetensors"
    description = {
        "format_version": FORMAT_VERSION,
        "settings": dataclasses.asdict(settings),
        "task": {"name": task.name, "max_length": task.max_length, "max_per_class": task.max_per_class},
        "sources": sources,
        "base": [str(base_weights), base_weights.stat().st_size],
    }
    return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()[:16]


def _task_seed(seed: int, task_name: str) -> int:
    digest = hashlib.sha256(f"{seed}:{task_name}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def _accuracy(logits: torch.Tensor, targets: torch.Tensor) -> float:
    return float((logits.argmax(dim=1) == targets).float().mean()) if len(targets) else 0.0


def train_frozen_base_head(
    train_embeddings: torch.Tensor,
    train_targets: torch.Tensor,
    labels: Sequence[str],
    settings: TextZooSettings,
    task_name: str,
) -> CosineHead:
    """Fit a cosine head on frozen embeddings: class-mean start, then full-batch Adam on cross-entropy."""
    head = CosineHead.from_class_means(train_embeddings, train_targets, labels, settings.logit_scale, task_name)
    optimizer = torch.optim.Adam(head.parameters(), lr=settings.probe_learning_rate)
    for _ in range(settings.probe_steps):
        loss = F.cross_entropy(head(train_embeddings), train_targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return head


def fine_tune(
    base: Encoder,
    head: CosineHead,
    train: Sequence[Example],
    labels: Sequence[str],
    max_length: int,
    settings: TextZooSettings,
    task_name: str,
    progress: ProgressCallback | None = None,
) -> Encoder:
    """Fine-tune a copy of the base encoder jointly with `head` (changed in place); return the copy."""
    torch.manual_seed(_task_seed(settings.seed, task_name))
    generator = torch.Generator().manual_seed(_task_seed(settings.seed, task_name))
    model = copy.deepcopy(base.model)
    model.train()
    if not settings.train_token_embeddings:
        model.get_input_embeddings().weight.requires_grad_(False)
    encoder = Encoder(model=model, tokenizer=base.tokenizer, device=base.device)
    head.to(base.device)

    optimizer = torch.optim.AdamW(
        [
            {"params": [p for p in model.parameters() if p.requires_grad], "lr": settings.learning_rate},
            {"params": list(head.parameters()), "lr": settings.head_learning_rate},
        ],
        weight_decay=0.0,
    )
    warmup = max(1, int(settings.steps * settings.warmup_fraction))

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (settings.steps - step) / max(1, settings.steps - warmup))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    targets = torch.tensor([labels.index(example.label) for example in train])
    order = torch.randperm(len(train), generator=generator)
    position = 0
    for step in range(settings.steps):
        if position + settings.batch_size > len(order):
            order = torch.randperm(len(train), generator=generator)
            position = 0
        batch = order[position : position + settings.batch_size]
        position += settings.batch_size

        embeddings = encode_batch(encoder, [train[int(i)].text for i in batch], max_length)
        loss = F.cross_entropy(head(embeddings), targets[batch].to(base.device))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
        if progress is not None:
            progress(f"fine-tune {task_name}", step + 1, settings.steps)

    model.get_input_embeddings().weight.requires_grad_(True)
    model.eval()
    head.cpu()
    return encoder


def build_task(
    task: TextTask,
    base: Encoder,
    settings: TextZooSettings,
    paths: DataPaths,
    folder: Path,
    progress: ProgressCallback | None = None,
) -> TaskResult:
    """Build one task into `folder` (which must not exist): data, both heads, fine-tuned model."""
    started = time.perf_counter()
    started_cpu = time.process_time()
    check_sources(task, paths)
    splits = split_examples(
        task.read(paths),
        test_size=settings.test_size,
        validation_size=settings.validation_size,
        train_size=settings.train_size,
        max_per_class=task.max_per_class,
    )
    if len(splits.labels) < 2 or not splits.train or not splits.test:
        raise MergekitExtError(
            f"Task {task.name}: needs at least 2 classes and non-empty train and test splits, got "
            f"{len(splits.labels)} classes, {len(splits.train)} train and {len(splits.test)} test texts. "
            "Add data to the task."
        )
    labels = splits.labels
    logger.info(
        "%s: %d classes, %d train / %d validation / %d test texts",
        task.name, len(labels), len(splits.train), len(splits.validation), len(splits.test),
    )  # fmt: skip
    folder.mkdir(parents=True)
    for name, split in (("train", splits.train), ("validation", splits.validation), ("test", splits.test)):
        write_jsonl(folder / f"{name}.jsonl", split)

    def report(stage: str) -> Any:
        if progress is None:
            return None
        total = len(splits.train)
        done = [0]

        def advance(count: int) -> None:
            done[0] += count
            progress(stage, done[0], total)

        return advance

    train_embeddings = embed_texts(
        base, [e.text for e in splits.train], max_length=task.max_length, progress=report(f"embed {task.name}")
    )
    train_targets = torch.tensor([labels.index(e.label) for e in splits.train])
    frozen_head = train_frozen_base_head(train_embeddings, train_targets, labels, settings, task.name)
    frozen_head.save(folder / "head_frozen_base.safetensors")
    test_texts = [e.text for e in splits.test]
    test_targets = torch.tensor([labels.index(e.label) for e in splits.test])
    with torch.no_grad():
        test_base = embed_texts(base, test_texts, max_length=task.max_length)
        frozen_accuracy = _accuracy(frozen_head(test_base), test_targets)

    head = copy.deepcopy(frozen_head)
    encoder = fine_tune(base, head, splits.train, labels, task.max_length, settings, task.name, progress)
    with torch.no_grad():
        test_tuned = embed_texts(encoder, test_texts, max_length=task.max_length)
        finetuned_accuracy = _accuracy(head(test_tuned), test_targets)
    encoder.model.save_pretrained(folder / "model")
    base.tokenizer.save_pretrained(folder / "model")
    head.save(folder / "head.safetensors")

    seconds = time.perf_counter() - started
    cpu_seconds = time.process_time() - started_cpu
    logger.info(
        "%s: frozen-base accuracy %.3f, fine-tuned accuracy %.3f (%.0f s)",
        task.name, frozen_accuracy, finetuned_accuracy, seconds,
    )  # fmt: skip
    return TaskResult(task.name, labels, splits, frozen_accuracy, finetuned_accuracy, seconds, cpu_seconds)


def _task_entry(task: TextTask, result: TaskResult, settings_hash: str) -> dict[str, Any]:
    prefix = f"tasks/{task.name}"
    return {
        "description": task.description,
        "classes": len(result.labels),
        "labels": result.labels,
        "max_length": task.max_length,
        "train_size": len(result.splits.train),
        "validation_size": len(result.splits.validation),
        "test_size": len(result.splits.test),
        "class_counts": result.splits.class_counts,
        "dropped_conflicting_texts": result.splits.dropped_conflicts,
        "frozen_base_accuracy": result.frozen_base_accuracy,
        "finetuned_accuracy": result.finetuned_accuracy,
        "build_seconds": round(result.seconds, 1),
        "build_cpu_seconds": round(result.cpu_seconds, 1),
        "settings_hash": settings_hash,
        "model": f"{prefix}/model",
        "head": f"{prefix}/head.safetensors",
        "frozen_base_head": f"{prefix}/head_frozen_base.safetensors",
        "train": f"{prefix}/train.jsonl",
        "validation": f"{prefix}/validation.jsonl",
        "test": f"{prefix}/test.jsonl",
    }


def _reusable_entry(folder: Path, settings_hash: str) -> dict[str, Any] | None:
    record = folder / "task.json"
    if not record.is_file():
        return None
    entry = json.loads(record.read_text(encoding="utf-8"))
    if entry.get("settings_hash") != settings_hash:
        return None
    if not (folder / "model" / "model.safetensors").is_file() or not (folder / "head.safetensors").is_file():
        return None
    return entry


def _ensure_base(zoo_dir: Path, base_source: Path) -> Encoder:
    """Re-save the base encoder into the zoo so its tensor names match the fine-tuned folders.

    The shipped file also stores the buffer `embeddings.position_ids`, which
    save_pretrained drops; merges need identical tensor names in every input.
    """
    base = load_encoder(base_source, "cpu")
    target = zoo_dir / "base"
    if not (target / "model.safetensors").is_file():
        temporary = zoo_dir / ".base.tmp"
        shutil.rmtree(temporary, ignore_errors=True)
        base.model.save_pretrained(temporary)
        base.tokenizer.save_pretrained(temporary)
        temporary.rename(target)
    return base


def build_text_zoo(
    zoo_dir: str | Path | None = None,
    *,
    settings: TextZooSettings | None = None,
    tasks: Sequence[str] | None = None,
    extra_tasks: Sequence[TextTask] = (),
    small: bool = False,
    paths: DataPaths | None = None,
    device: str = "cpu",
    force: bool = False,
    num_threads: int | None = None,
    progress: ProgressCallback | None = None,
) -> tuple[Path, dict[str, Any]]:
    """Build (or reuse) the text zoo and return its folder and manifest.

    Every task's data files are checked before any training starts, so a missing
    Debian package stops the build at once with the apt-get line to run.
    `num_threads` sets torch's CPU threads for the rest of the process (None keeps
    torch's default). On a CPU shared with other busy processes, 1 thread avoids
    threads waiting on each other and is often faster.
    """
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    settings = settings or (TextZooSettings.small() if small else TextZooSettings())
    paths = paths or DataPaths()
    zoo_dir = Path(zoo_dir) if zoo_dir is not None else default_zoo_dir(small)
    selected = resolve_tasks(tasks, extra_tasks, small)
    for task in selected:
        check_sources(task, paths)
    base_source = locate_minilm()
    if zoo_dir.exists() and not zoo_dir.is_dir():
        raise OutputError(f"Zoo folder {zoo_dir} exists and is not a folder. Remove it or pass another folder.")
    zoo_dir.mkdir(parents=True, exist_ok=True)

    started_wall = time.perf_counter()
    started_cpu = time.process_time()
    base = _ensure_base(zoo_dir, base_source)
    base.model.to(device)
    base.device = torch.device(device)
    entries: dict[str, dict[str, Any]] = {}
    rebuilt: list[str] = []
    for task in selected:
        folder = zoo_dir / "tasks" / task.name
        settings_hash = task_settings_hash(task, settings, paths, zoo_dir / "base")
        entry = None if force else _reusable_entry(folder, settings_hash)
        if entry is None:
            temporary = zoo_dir / "tasks" / f".{task.name}.tmp"
            shutil.rmtree(temporary, ignore_errors=True)
            result = build_task(task, base, settings, paths, temporary, progress)
            entry = _task_entry(task, result, settings_hash)
            (temporary / "task.json").write_text(json.dumps(entry, indent=2), encoding="utf-8")
            shutil.rmtree(folder, ignore_errors=True)
            temporary.rename(folder)
            rebuilt.append(task.name)
        else:
            logger.info("%s: reusing the cached build in %s", task.name, folder)
        entries[task.name] = entry

    manifest_path = zoo_dir / MANIFEST_NAME
    if not rebuilt and manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        if list(manifest.get("tasks", {})) == list(entries):
            return zoo_dir, manifest

    manifest = {
        "zoo": "text",
        "format_version": FORMAT_VERSION,
        "base_model": "base",
        "base_source": str(base_source),
        "seed": settings.seed,
        "settings": dataclasses.asdict(settings),
        "built_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        # sums over the listed tasks, each measured when it was built (cached tasks keep their times)
        "build_seconds": round(sum(entry["build_seconds"] for entry in entries.values()), 1),
        "build_cpu_seconds": round(sum(entry.get("build_cpu_seconds", 0.0) for entry in entries.values()), 1),
        "run_seconds": round(time.perf_counter() - started_wall, 1),
        "run_cpu_seconds": round(time.process_time() - started_cpu, 1),
        "rebuilt_tasks": rebuilt,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "tasks": entries,
    }
    temporary_manifest = manifest_path.with_suffix(".json.tmp")
    temporary_manifest.write_text(json.dumps(manifest, indent=2), encoding="utf-8")
    temporary_manifest.replace(manifest_path)
    return zoo_dir, manifest

