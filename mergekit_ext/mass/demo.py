"""The main-job demonstration: classic merges against MASS on the text zoo, task unknown.

The demo builds the text zoo when it is not cached and merges all its tasks with task
arithmetic, TIES and TSV-M, and into a MASS artifact (whose shared model is the TSV-M
merge). It evaluates each merge on the test splits with the task unknown, so the head
with the largest max logit wins. It also measures the MASS storage factor and its latency against one forward pass.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mergekit_ext.engine import MergeOptions, run_recipe
from mergekit_ext.mass.build import MassBuildOptions, build_mass_artifact
from mergekit_ext.mass.config import MassConfig
from mergekit_ext.mass.evaluation import MassVariant, evaluate_mass_variants, measure_latency, zoo_texts
from mergekit_ext.mass.runtime import MassModel
from mergekit_ext.recipe import parse_recipe
from mergekit_ext.stamp import expected_stamp, is_current, write_stamp
from mergekit_ext.cache import cache_root
from mergekit_ext.zoo.evaluate import EvalResult, evaluate_text_zoo, read_manifest
from mergekit_ext.zoo.text import build_text_zoo

logger = logging.getLogger(__name__)

ProgressCallback = Callable[[str, int, int], None]

# Classic merge settings. Task arithmetic sums the task vectors, so it needs a scale
# below 1 for six tasks; 0.3 is the FusionBench default for CLIP ViT-B/32. TIES averages
# the agreeing entries (normalize on), so its scale stays 1.
CLASSIC_MERGES: dict[str, dict[str, Any]] = {
    "task arithmetic": {"merge_method": "task_arithmetic", "parameters": {"lambda": 0.3}},
    "TIES": {"merge_method": "ties", "parameters": {"density": 0.2, "lambda": 1.0}},
    "TSV-M": {"merge_method": "tsv", "parameters": {"alpha": 1.0}},
}
REUSE_PREFIX = "MASS --reuse-prefix"
LATENCY_BATCH_SIZE = 64
LATENCY_BATCHES = 2
# Rounds of the latency timing; the fastest round counts.
LATENCY_ROUNDS = 2
# Enough cache entries for every task set the test splits use, so latency excludes merging.
DEMO_CACHE_CAPACITY = 64


@dataclass
class DemoRow:
    """Accuracy of one method: per task, average, and normalized by the fine-tuned models."""

    method: str
    per_task: dict[str, float]
    average: float
    normalized: float
    routing_top1: float | None = None


@dataclass
class DemoReport:
    """Everything `merge demo` prints."""

    zoo_dir: Path
    tasks: list[str]
    finetuned: dict[str, float]
    rows: list[DemoRow] = field(default_factory=list)
    storage_factor: float = 0.0
    latency_ratio: float = 0.0
    reuse_prefix_latency_ratio: float = 0.0
    reuse_prefix_normalized: float = 0.0
    distinct_task_sets: int = 0
    seconds: float = 0.0
    reused: dict[str, bool] = field(default_factory=dict)  # merge → taken from an earlier run


def _row(method: str, result: EvalResult, routing_top1: float | None = None) -> DemoRow:
    return DemoRow(
        method=method,
        per_task={item.task: item.accuracy for item in result.tasks},
        average=result.average_accuracy,
        normalized=result.average_normalized_accuracy,
        routing_top1=routing_top1,
    )


def run_demo(
    *,
    small: bool = False,
    device: str = "cpu",
    zoo_dir: Path | None = None,
    work_dir: Path | None = None,
    seed: int = 0,
    rebuild: bool = False,
    latency: bool = True,
    progress: ProgressCallback | None = None,
) -> DemoReport:
    """Run the demonstration and return its report (the zoo is built first when missing).

    Merged models and the MASS artifact from an earlier run in `work_dir` are reused
    when their settings, inputs and this package's code are unchanged (see
    `mergekit_ext.stamp`), unless `rebuild` is set. Evaluation always runs; the latency
    measurement only with `latency`.
    """
    started = time.perf_counter()
    if zoo_dir is not None and (zoo_dir / "zoo.json").is_file():
        # An explicit, finished zoo is used as it is, even if built with other settings.
        manifest = read_manifest(zoo_dir)
    else:
        zoo_dir, manifest = build_text_zoo(zoo_dir, small=small, device=device, progress=progress)
    tasks = list(manifest["tasks"])
    base = zoo_dir / manifest["base_model"]
    models = [zoo_dir / manifest["tasks"][task]["model"] for task in tasks]
    heads = [zoo_dir / manifest["tasks"][task]["head"] for task in tasks]
    work = work_dir or cache_root() / "demo" / zoo_dir.name
    report = DemoReport(
        zoo_dir=zoo_dir, tasks=tasks, finetuned={t: float(manifest["tasks"][t]["finetuned_accuracy"]) for t in tasks}
    )

    for method, settings in CLASSIC_MERGES.items():
        if settings["merge_method"] == "tsv":
            continue  # the MASS artifact's shared model, evaluated below
        output = work / settings["merge_method"]
        recipe_data = {"base_model": str(base), "models": [{"model": str(m)} for m in models], **settings}

        def merge(output: Path = output, recipe_data: dict[str, Any] = recipe_data) -> None:
            run_recipe(parse_recipe(recipe_data), MergeOptions(output=output, seed=seed, device=device, force=True))

        report.reused[method] = _build_or_reuse(output, {"recipe": recipe_data, "seed": seed, "device": device}, [base, *models], merge, rebuild)
        result = evaluate_text_zoo(output, zoo_dir, unknown_task=True, device=device, progress=progress)
        report.rows.append(_row(method, result))
        logger.info("%s: normalized accuracy %.3f", method, result.average_normalized_accuracy)

    artifact = work / "mass"
    build_options = MassBuildOptions(device=device, seed=seed, force=True)

    def build() -> None:
        build_mass_artifact(base, models, artifact, task_names=tasks, heads=heads, options=build_options)

    mass_settings = {"options": dataclasses.asdict(build_options), "tasks": tasks}
    report.reused["MASS"] = _build_or_reuse(artifact, mass_settings, [base, *models, *heads], build, rebuild)
    report.storage_factor = MassConfig.load(artifact).storage.storage_factor
    # The artifact's shared model is θ_base + TSV-M of all tasks, the same weights as the
    # `tsv` merge method gives (tests/mass/test_mass_artifact.py). It is evaluated as the
    # TSV-M row, continuing from MASS's pass 1, instead of merging the same model again.
    model = MassModel.from_pretrained(artifact, device=device, cache_capacity=DEMO_CACHE_CAPACITY)
    variants = [
        MassVariant("TSV-M", shared_model=True),
        MassVariant("MASS", "topk"),
        MassVariant("MASS top-1", "top1"),
        MassVariant(REUSE_PREFIX, "topk", reuse_prefix=True),
    ]
    results = evaluate_mass_variants(model, zoo_dir, variants, model_name=str(artifact), progress=progress)
    report.rows.append(_row("TSV-M", results["TSV-M"].accuracy))
    for label in ("MASS", "MASS top-1"):
        report.rows.append(_row(label, results[label].accuracy, results[label].routing.top1_accuracy))
    report.reuse_prefix_normalized = results[REUSE_PREFIX].accuracy.average_normalized_accuracy

    if latency:
        timing = measure_latency(model, _latency_batches(zoo_dir, tasks), repeats=LATENCY_ROUNDS, with_reuse_prefix=True)
        report.latency_ratio = timing.ratio
        report.reuse_prefix_latency_ratio = timing.reuse_prefix_ratio or 0.0
    report.distinct_task_sets = len(model.cache)
    report.seconds = time.perf_counter() - started
    return report


def _build_or_reuse(output: Path, settings: dict[str, Any], inputs: list[Path], build: Callable[[], None], rebuild: bool) -> bool:
    """Run `build` unless `output` is current for these settings and inputs; return True when reused."""
    stamp_file = output.with_name(output.name + ".stamp.json")
    expected = expected_stamp(settings, inputs)
    if not rebuild and is_current(output, stamp_file, expected):
        logger.info("Reusing %s: settings, inputs and code are unchanged", output)
        return True
    stamp_file.unlink(missing_ok=True)
    build()
    write_stamp(output, stamp_file, expected)
    return False


def _latency_batches(zoo_dir: Path, tasks: list[str]) -> list[list[str]]:
    """Return test batches that mix the tasks (round robin), as a deployed model would see them."""
    texts = zoo_texts(zoo_dir, tasks, "test")
    mixed: list[str] = []
    for position in range(max(len(t) for t in texts.values())):
        mixed.extend(texts[task][position] for task in tasks if position < len(texts[task]))
    count = min(LATENCY_BATCHES, max(len(mixed) // LATENCY_BATCH_SIZE, 1))
    return [mixed[i * LATENCY_BATCH_SIZE : (i + 1) * LATENCY_BATCH_SIZE] for i in range(count)]
