"""Evaluation of a MASS artifact on the text zoo: accuracy, routing accuracy, latency.

Accuracy runs through the zoo's `evaluate_model` with the artifact as a
`TaskLogitsModel`. Routing accuracy runs pass 1 alone on every text of a split:
top-1 is the share of texts whose largest routing weight is their own task, and
coverage the share whose task set Ω contains their task.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from mergekit_ext.errors import RecipeError
from mergekit_ext.mass.router import select_tasks
from mergekit_ext.mass.runtime import MassModel
from mergekit_ext.zoo.evaluate import EvalResult, evaluate_model, read_manifest, read_split

logger = logging.getLogger(__name__)

ProgressCallback = Callable[[str, int, int], None]

# With 6 tasks and top-3 routing, up to 41 task sets occur. A cache with room for all of
# them merges each set once per evaluation instead of once per batch.
EVAL_CACHE_CAPACITY = 64


@dataclass
class RoutingReport:
    """Routing accuracy on one split: overall and per task."""

    split: str
    top1_accuracy: float
    coverage: float  # share of texts whose task set contains their task
    mean_set_size: float
    per_task_top1: dict[str, float] = field(default_factory=dict)


@dataclass
class MassEvalResult:
    """Accuracy (from the zoo evaluation) and routing accuracy of one artifact."""

    accuracy: EvalResult
    routing: RoutingReport
    settings: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {"accuracy": self.accuracy.to_dict(), "routing": asdict(self.routing), "settings": self.settings}


def zoo_texts(zoo_dir: Path, tasks: Sequence[str], split: str) -> dict[str, list[str]]:
    """Return the texts of one split of each task, read from a built zoo."""
    manifest = read_manifest(zoo_dir)
    texts = {}
    for task in tasks:
        entry = manifest["tasks"][task]
        if split not in entry:
            raise RecipeError(f"the zoo at {zoo_dir} has no {split!r} split for {task}")
        texts[task] = [example.text for example in read_split(zoo_dir / entry[split])]
    return texts


def routing_accuracy(
    model: MassModel, texts_by_task: dict[str, list[str]], *, split: str = "test", batch_size: int = 128
) -> RoutingReport:
    """Route every text (pass 1 only) and compare with the task it comes from."""
    top1_hits = 0
    covered = 0
    set_sizes = 0
    total = 0
    per_task: dict[str, float] = {}
    for task, texts in texts_by_task.items():
        task_index = model.task_names.index(task)
        task_hits = 0
        for start in range(0, len(texts), batch_size):
            batch = model.adapter.prepare(texts[start : start + batch_size])
            decision, _ = model.route(batch)
            task_sets = decision.task_sets
            if model.routing == "batch":
                task_sets = select_tasks(decision.weights.mean(dim=0, keepdim=True), model.settings) * batch.size
            task_hits += int((decision.weights.argmax(dim=1) == task_index).sum())
            covered += sum(task_index in task_set for task_set in task_sets)
            set_sizes += sum(len(task_set) for task_set in task_sets)
        per_task[task] = task_hits / max(len(texts), 1)
        top1_hits += task_hits
        total += len(texts)
    return RoutingReport(
        split=split,
        top1_accuracy=top1_hits / max(total, 1),
        coverage=covered / max(total, 1),
        mean_set_size=set_sizes / max(total, 1),
        per_task_top1=per_task,
    )


def evaluate_mass_text_zoo(
    artifact: str | Path,
    zoo_dir: str | Path,
    *,
    oracle_head: bool = False,
    batch_routing: bool = False,
    mode: str | None = None,
    reuse_prefix: bool | None = None,
    router_layer: int | None = None,
    device: str = "cpu",
    batch_size: int = 128,
    tasks: Sequence[str] | None = None,
    progress: ProgressCallback | None = None,
    model: MassModel | None = None,
    cache_capacity: int = EVAL_CACHE_CAPACITY,
) -> MassEvalResult:
    """Evaluate an artifact on the zoo's test splits with the task unknown (or an oracle head)."""
    zoo_dir = Path(zoo_dir)
    if model is None:
        model = MassModel.from_pretrained(
            artifact, device=device, mode=mode, reuse_prefix=reuse_prefix, router_layer=router_layer,
            routing="batch" if batch_routing else "sample", cache_capacity=cache_capacity,
        )  # fmt: skip
    manifest = read_manifest(zoo_dir)
    selected = list(tasks) if tasks else [t for t in manifest["tasks"] if t in model.task_names]
    missing = [t for t in selected if t not in model.task_names]
    if missing:
        raise RecipeError(f"the artifact {artifact} has no task {missing[0]!r}; it has {model.task_names}")
    # The unknown-task evaluation of a plain encoder truncates at the longest of all tasks' lengths.
    if hasattr(model.adapter, "max_length"):
        model.adapter.max_length = max(int(manifest["tasks"][t]["max_length"]) for t in selected)

    model.restrict_to_selected = not oracle_head
    accuracy = evaluate_model(
        model, zoo_dir, model_name=str(artifact), tasks=selected, unknown_task=not oracle_head,
        batch_size=batch_size, progress=progress,
    )  # fmt: skip
    routing = routing_accuracy(model, zoo_texts(zoo_dir, selected, "test"), split="test", batch_size=batch_size)
    settings = {
        "oracle_head": oracle_head,
        "batch_routing": batch_routing,
        "mode": model.settings.mode,
        "reuse_prefix": model.reuse_prefix,
        "router_layer": model.router_layer,
        "threshold": model.settings.threshold,
        "top_k": model.settings.top_k,
        "temperature": model.settings.temperature,
    }
    return MassEvalResult(accuracy=accuracy, routing=routing, settings=settings)


@dataclass
class SweepPoint:
    """Routing and task-unknown accuracy with the router at one block."""

    layer: int
    top1_accuracy: float
    coverage: float
    mean_set_size: float
    accuracy: float
    normalized_accuracy: float


def split_accuracy(model: MassModel, zoo_dir: Path, tasks: Sequence[str], split: str, batch_size: int = 128) -> dict[str, float]:
    """Return the task-unknown accuracy of each task on one split (task and class must both match)."""
    manifest = read_manifest(zoo_dir)
    accuracies = {}
    for task in tasks:
        entry = manifest["tasks"][task]
        labels: list[str] = entry["labels"]
        examples = read_split(zoo_dir / entry[split])
        task_index = model.task_names.index(task)
        correct = 0
        for start in range(0, len(examples), batch_size):
            batch = examples[start : start + batch_size]
            prediction = model.predict([example.text for example in batch])
            targets = torch.tensor([labels.index(example.label) for example in batch])
            correct += int(((prediction.task_index == task_index) & (prediction.class_index == targets)).sum())
        accuracies[task] = correct / max(len(examples), 1)
    return accuracies


def router_layer_sweep(
    model: MassModel, zoo_dir: str | Path, *, split: str = "validation", layers: Sequence[int] | None = None
) -> list[SweepPoint]:
    """Measure routing and task-unknown accuracy on a split with the router at each block in turn."""
    zoo_dir = Path(zoo_dir)
    manifest = read_manifest(zoo_dir)
    tasks = [t for t in manifest["tasks"] if t in model.task_names]
    texts = zoo_texts(zoo_dir, tasks, split)
    original = model.router_layer
    points = []
    try:
        for layer in layers if layers is not None else range(len(model.blocks)):
            model.set_router_layer(layer)
            routing = routing_accuracy(model, texts, split=split)
            accuracy = split_accuracy(model, zoo_dir, tasks, split)
            normalized = [accuracy[t] / float(manifest["tasks"][t]["finetuned_accuracy"]) for t in tasks]
            points.append(
                SweepPoint(
                    layer=layer, top1_accuracy=routing.top1_accuracy, coverage=routing.coverage,
                    mean_set_size=routing.mean_set_size, accuracy=sum(accuracy.values()) / len(tasks),
                    normalized_accuracy=sum(normalized) / len(tasks),
                )
            )  # fmt: skip
            logger.info("router layer %d: routing top-1 %.3f, accuracy %.3f", layer, routing.top1_accuracy, points[-1].accuracy)
    finally:
        model.set_router_layer(original)
    return points


@dataclass
class LatencyReport:
    """Median seconds per batch of one pass of one model and of MASS inference, with their ratio."""

    batch_size: int
    single_pass_seconds: float
    mass_seconds: float

    @property
    def ratio(self) -> float:
        return self.mass_seconds / self.single_pass_seconds


def measure_latency(model: MassModel, batches: Sequence[Any], *, repeats: int = 3) -> LatencyReport:
    """Time MASS inference against one pass of the shared model on the same batches (warm cache).

    Every batch runs once before timing, so the merged weights of its task sets are
    cached. The ratio excludes merging only if the cache has room for all those sets.
    The two are timed alternately, batch by batch, so load from other processes hits
    both alike; each is the median over `repeats` rounds.
    """
    for batch in batches:
        model.run(batch)
        model.shared_features(batch)

    single_rounds: list[float] = []
    mass_rounds: list[float] = []
    with torch.inference_mode():
        for _ in range(repeats):
            single = mass = 0.0
            for batch in batches:
                started = time.perf_counter()
                model.shared_features(batch)
                single += time.perf_counter() - started
                started = time.perf_counter()
                model.run(batch)
                mass += time.perf_counter() - started
            single_rounds.append(single / len(batches))
            mass_rounds.append(mass / len(batches))
    middle = repeats // 2
    return LatencyReport(
        batch_size=len(batches[0]),
        single_pass_seconds=sorted(single_rounds)[middle],
        mass_seconds=sorted(mass_rounds)[middle],
    )
