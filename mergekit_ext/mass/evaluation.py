"""Evaluation of a MASS artifact on the text zoo: accuracy, routing accuracy, latency.

Accuracy follows the zoo's protocol (`mergekit_ext.zoo.evaluate`): with the task
unknown, the head with the largest max logit among Ω wins, and a text counts as
correct only if both its task and its class are right. Routing top-1 accuracy is the
share of texts whose largest routing weight is their own task, and coverage the share
whose task set Ω contains their task.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from mergekit_ext.errors import RecipeError
from mergekit_ext.mass.router import RoutingDecision, RoutingMode, residual_norms, routing_weights, select_tasks
from mergekit_ext.mass.config import TokenRule
from mergekit_ext.mass.runtime import MassModel
from mergekit_ext.mass.task_store import TaskSet
from mergekit_ext.models.adapters import ModelBatch
from mergekit_ext.zoo.evaluate import EVAL_BATCH_SIZE, EvalResult, TaskAccuracy, read_manifest, read_split, score_batch, sorted_test_split

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
    model: MassModel, texts_by_task: dict[str, list[str]], *, split: str = "test", batch_size: int = EVAL_BATCH_SIZE
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
            task_sets = model.task_sets_for(decision)
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


@dataclass(frozen=True)
class MassVariant:
    """One way to run an artifact at evaluation: routing mode, prefix reuse, oracle head.

    `shared_model` runs the shared model θ_MT (the TSV-M merge of all tasks) for every
    sample with every head, continuing from pass 1: the TSV-M baseline at little cost.
    """

    label: str
    mode: RoutingMode = "topk"
    reuse_prefix: bool = False
    oracle_head: bool = False
    shared_model: bool = False


def evaluate_mass_text_zoo(
    artifact: str | Path,
    zoo_dir: str | Path,
    *,
    oracle_head: bool = False,
    batch_routing: bool = False,
    mode: str | None = None,
    reuse_prefix: bool | None = None,
    router_layer: int | None = None,
    router_rank: int | None = None,
    token_rule: TokenRule | None = None,
    device: str = "cpu",
    batch_size: int = EVAL_BATCH_SIZE,
    tasks: Sequence[str] | None = None,
    progress: ProgressCallback | None = None,
    model: MassModel | None = None,
    cache_capacity: int = EVAL_CACHE_CAPACITY,
) -> MassEvalResult:
    """Evaluate an artifact on the zoo's test splits with the task unknown (or an oracle head)."""
    if model is None:
        model = MassModel.from_pretrained(
            artifact, device=device, mode=mode, reuse_prefix=reuse_prefix, router_layer=router_layer,
            router_rank=router_rank, token_rule=token_rule, routing="batch" if batch_routing else "sample",
            cache_capacity=cache_capacity,
        )  # fmt: skip
    variant = MassVariant(label="MASS", mode=model.settings.mode, reuse_prefix=model.reuse_prefix, oracle_head=oracle_head)
    results = evaluate_mass_variants(model, zoo_dir, [variant], model_name=str(artifact), tasks=tasks, batch_size=batch_size, progress=progress)
    return results[variant.label]


def evaluate_mass_variants(
    model: MassModel,
    zoo_dir: str | Path,
    variants: Sequence[MassVariant],
    *,
    model_name: str = "",
    tasks: Sequence[str] | None = None,
    batch_size: int = EVAL_BATCH_SIZE,
    progress: ProgressCallback | None = None,
) -> dict[str, MassEvalResult]:
    """Evaluate several variants of one artifact on the test splits, sharing pass 1.

    Pass 1 depends only on the shared model and the router block, so it runs once per
    batch. Each variant then routes with its own mode and runs its own pass 2. Routing
    accuracy comes from the same pass 1. Returns one result per variant label.
    """
    zoo_dir = Path(zoo_dir)
    manifest = read_manifest(zoo_dir)
    selected = list(tasks) if tasks else [t for t in manifest["tasks"] if t in model.task_names]
    missing = [t for t in selected if t not in model.task_names]
    if missing:
        artifact = model_name or "the MASS artifact"
        raise RecipeError(f"{artifact} has no task {missing[0]!r}; it has {model.task_names}. Pick tasks from that list")
    labels = [variant.label for variant in variants]
    if len(set(labels)) != len(labels):
        raise ValueError(f"variant labels {labels} repeat; give each variant its own label")
    # The unknown-task evaluation of a plain encoder truncates at the longest of all tasks' lengths.
    if hasattr(model.adapter, "max_length"):
        model.adapter.max_length = max(int(manifest["tasks"][t]["max_length"]) for t in selected)

    keep_prefix = any(variant.reuse_prefix or variant.shared_model for variant in variants)
    settings = {v.label: dataclasses.replace(model.settings, mode=v.mode) for v in variants}
    tallies = {v.label: _Tally() for v in variants}
    names = model.task_names
    for task in selected:
        entry = manifest["tasks"][task]
        examples = sorted_test_split(zoo_dir, entry)
        task_index = names.index(task)
        for start in range(0, len(examples), batch_size):
            chunk = examples[start : start + batch_size]
            targets = torch.tensor([entry["labels"].index(example.label) for example in chunk])
            batch = model.adapter.prepare([example.text for example in chunk])
            features, prefix = model.router_features(batch, keep_prefix=keep_prefix)
            residuals = residual_norms(features, model.bases)
            weights = routing_weights(residuals, model.settings.temperature)
            decisions: dict[str, RoutingDecision] = {}
            sets: dict[str, list[TaskSet]] = {}
            for v in variants:
                decisions[v.label] = RoutingDecision(residuals, weights, select_tasks(weights, settings[v.label]))
                if v.shared_model:
                    sets[v.label] = [tuple(range(len(names)))] * batch.size
                else:
                    sets[v.label] = model.task_sets_for(decisions[v.label], settings[v.label])
            faithful = {v.label: sets[v.label] for v in variants if not (v.shared_model or v.reuse_prefix)}
            second_passes = _deduplicated_second_pass(model, batch, faithful)
            for variant in variants:
                decision, task_sets = decisions[variant.label], sets[variant.label]
                if variant.shared_model:
                    outputs = model.shared_features_from_prefix(batch, prefix)
                elif variant.reuse_prefix:
                    outputs = model.second_pass(batch, task_sets, prefix)
                else:
                    outputs = second_passes[variant.label]
                head_logits = model.selected_head_logits(outputs, task_sets, restrict=not variant.oracle_head)
                candidates = selected if not variant.oracle_head else [task]
                logits = {name: head_logits[names.index(name)].cpu() for name in candidates}
                tallies[variant.label].add(task, decision, task_sets, task_index, *score_batch(logits, candidates, task, targets))
            if progress is not None:
                progress(f"MASS {task}", min(start + batch_size, len(examples)), len(examples))
        logger.info("%s: %s", task, ", ".join(f"{label} {tallies[label].accuracy(task):.4f}" for label in labels))

    results = {}
    for variant in variants:
        tally = tallies[variant.label]
        accuracy = EvalResult(model=model_name, zoo=str(zoo_dir), unknown_task=not variant.oracle_head)
        for task in selected:
            reference = float(manifest["tasks"][task]["finetuned_accuracy"])
            value = tally.accuracy(task)
            accuracy.tasks.append(
                TaskAccuracy(
                    task=task, test_size=tally.count[task], accuracy=value, finetuned_accuracy=reference,
                    normalized_accuracy=value / reference if reference > 0 else 0.0,
                    task_choice_accuracy=None if variant.oracle_head else tally.right_head[task] / max(tally.count[task], 1),
                )
            )  # fmt: skip
        run_settings = {
            "oracle_head": variant.oracle_head,
            "batch_routing": model.routing == "batch",
            "mode": variant.mode,
            "reuse_prefix": variant.reuse_prefix,
            "router_layer": model.router_layer,
            "router_rank": model.router_rank,
            "token_rule": model.adapter.token_rule,
            "threshold": model.settings.threshold,
            "top_k": model.settings.top_k,
            "temperature": model.settings.temperature,
        }
        results[variant.label] = MassEvalResult(accuracy=accuracy, routing=tally.routing(selected), settings=run_settings)
    return results


def _deduplicated_second_pass(
    model: MassModel, batch: ModelBatch, sets_by_label: dict[str, list[TaskSet]]
) -> dict[str, torch.Tensor]:
    """Run pass 2 (no prefix reuse) of several variants, once per distinct (text, Ω) pair.

    Where top-k routing picks a single task, its Ω equals top-1's. The text's pass 2
    is then the same computation in both variants, so it runs once.
    """
    pairs: dict[tuple[int, TaskSet], int] = {}
    for task_sets in sets_by_label.values():
        for row, task_set in enumerate(task_sets):
            pairs.setdefault((row, task_set), len(pairs))
    if not pairs:
        return {}
    rows = torch.tensor([row for row, _ in pairs], device=model.adapter.device)
    expanded = model.adapter.select_rows(batch, rows, keep_length=True)
    features = model.second_pass(expanded, [task_set for _, task_set in pairs])
    return {
        label: features[[pairs[(row, task_set)] for row, task_set in enumerate(task_sets)]]
        for label, task_sets in sets_by_label.items()
    }


@dataclass
class _Tally:
    """Counts of one variant: per task, texts, correct predictions, right heads and routing hits."""

    count: dict[str, int] = field(default_factory=dict)
    correct: dict[str, int] = field(default_factory=dict)
    right_head: dict[str, int] = field(default_factory=dict)
    top1_hits: dict[str, int] = field(default_factory=dict)
    covered: int = 0
    set_sizes: int = 0

    def add(self, task: str, decision: RoutingDecision, task_sets: Sequence[TaskSet], task_index: int, correct: int, right_head: int) -> None:
        self.count[task] = self.count.get(task, 0) + len(task_sets)
        self.correct[task] = self.correct.get(task, 0) + correct
        self.right_head[task] = self.right_head.get(task, 0) + right_head
        self.top1_hits[task] = self.top1_hits.get(task, 0) + int((decision.weights.argmax(dim=1) == task_index).sum())
        self.covered += sum(task_index in task_set for task_set in task_sets)
        self.set_sizes += sum(len(task_set) for task_set in task_sets)

    def accuracy(self, task: str) -> float:
        return self.correct.get(task, 0) / max(self.count.get(task, 0), 1)

    def routing(self, tasks: Sequence[str]) -> RoutingReport:
        total = max(sum(self.count.values()), 1)
        return RoutingReport(
            split="test",
            top1_accuracy=sum(self.top1_hits.values()) / total,
            coverage=self.covered / total,
            mean_set_size=self.set_sizes / total,
            per_task_top1={task: self.top1_hits.get(task, 0) / max(self.count.get(task, 0), 1) for task in tasks},
        )


@dataclass
class SweepPoint:
    """Routing and task-unknown accuracy with the router at one block."""

    layer: int
    top1_accuracy: float
    coverage: float
    mean_set_size: float
    accuracy: float
    normalized_accuracy: float


def split_accuracy(model: MassModel, zoo_dir: Path, tasks: Sequence[str], split: str, batch_size: int = EVAL_BATCH_SIZE) -> dict[str, float]:
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
    """Median seconds per batch of one pass of one model and of MASS inference, with their ratio.

    `reuse_prefix_seconds` is MASS inference with `--reuse-prefix`, when it was measured.
    """

    batch_size: int
    single_pass_seconds: float
    mass_seconds: float
    reuse_prefix_seconds: float | None = None

    @property
    def ratio(self) -> float:
        return self.mass_seconds / self.single_pass_seconds

    @property
    def reuse_prefix_ratio(self) -> float | None:
        return None if self.reuse_prefix_seconds is None else self.reuse_prefix_seconds / self.single_pass_seconds


def measure_latency(model: MassModel, batches: Sequence[Any], *, repeats: int = 3, with_reuse_prefix: bool = False) -> LatencyReport:
    """Time MASS inference against one pass of the shared model on the same batches (warm cache).

    MASS runs as the model is set (`model.reuse_prefix`); `with_reuse_prefix` also times
    it with the prefix reused, in the same rounds. The task sets of every batch are
    merged before timing, so the ratio excludes merging as long as the cache has room
    for all of them. The runs are timed alternately, batch by batch, so load from other
    processes hits all alike. Each time is the fastest of `repeats` rounds, since load
    from other processes can only add time.
    """
    modes = [model.reuse_prefix, True] if with_reuse_prefix else [model.reuse_prefix]
    for batch in batches:
        decision, _ = model.route(model.adapter.prepare(batch))
        for task_set in set(model.task_sets_for(decision)):
            model.cache.get(task_set)
    model.shared_features(batches[0])  # the first forward pass of a process is slow

    single_rounds: list[float] = []
    mass_rounds: list[list[float]] = [[] for _ in modes]
    original = model.reuse_prefix
    try:
        with torch.inference_mode():
            for _ in range(repeats):
                single = 0.0
                mass = [0.0] * len(modes)
                for batch in batches:
                    started = time.perf_counter()
                    model.shared_features(batch)
                    single += time.perf_counter() - started
                    for index, reuse in enumerate(modes):
                        model.reuse_prefix = reuse
                        started = time.perf_counter()
                        model.run(batch)
                        mass[index] += time.perf_counter() - started
                single_rounds.append(single / len(batches))
                for index, seconds in enumerate(mass):
                    mass_rounds[index].append(seconds / len(batches))
    finally:
        model.reuse_prefix = original
    return LatencyReport(
        batch_size=len(batches[0]),
        single_pass_seconds=min(single_rounds),
        mass_seconds=min(mass_rounds[0]),
        reuse_prefix_seconds=min(mass_rounds[1]) if with_reuse_prefix else None,
    )
