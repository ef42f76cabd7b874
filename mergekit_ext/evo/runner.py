"""Entry points of the evo commands: search, grid evaluation and test-set measurement."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from mergekit_ext.device import resolve_device
from mergekit_ext.errors import RecipeError
from mergekit_ext.evo.archive import ArchiveEntry
from mergekit_ext.evo.backends import CandidateProgress, make_backend, parse_dtype
from mergekit_ext.evo.config import EvoConfig, load_config, parse_config
from mergekit_ext.evo.data import MathProblem, load_benchmark
from mergekit_ext.evo.fitness import CandidateResult, score
from mergekit_ext.evo.genome import Genome
from mergekit_ext.evo.ray_cluster import RaySettings
from mergekit_ext.evo.report import PARENTS_FILE
from mergekit_ext.evo.search import (
    RUN_FILE,
    ProgressCallback,
    Search,
    prepare_run_dir,
    write_run_file,
)

logger = logging.getLogger(__name__)


def load_problems(config: EvoConfig) -> list[MathProblem]:
    """Load the search problems: the benchmark, filtered by the subset file, cut to `limit`."""
    problems = load_benchmark(config.data.problems)
    if config.data.subset is not None:
        subset_path = Path(config.data.subset)
        if not subset_path.is_file():
            raise RecipeError(f"Subset file {subset_path} not found; write it with `merge evo subset`.")
        wanted = json.loads(subset_path.read_text(encoding="utf-8"))["ids"]
        by_id = {problem.id: problem for problem in problems}
        missing = [identifier for identifier in wanted if identifier not in by_id]
        if missing:
            raise RecipeError(f"Subset {subset_path} names {len(missing)} ids not in {config.data.problems}, "
                              f"first {missing[0]}; use the subset written for these problems.")
        problems = [by_id[identifier] for identifier in wanted]
    if config.data.limit is not None:
        problems = problems[: config.data.limit]
    return problems


def run_search(
    config_path: Path | None,
    run_dir: Path,
    resume: bool = False,
    device: str = "auto",
    force: bool = False,
    progress: ProgressCallback | None = None,
    ray_settings: RaySettings | None = None,
) -> list[ArchiveEntry]:
    """Run (or resume) a search into `run_dir` and return the Pareto front.

    When resuming, the configuration stored in `run.json` is used and
    `config_path` must be None or the same settings. With `ray_settings`, Ray
    actors evaluate the candidates, each running the configuration's backend.
    """
    run_dir = Path(run_dir)
    prepare_run_dir(run_dir, resume, force)
    if resume:
        stored = json.loads((run_dir / RUN_FILE).read_text(encoding="utf-8"))
        config = parse_config(stored["config"], source=str(run_dir / RUN_FILE))
    else:
        if config_path is None:
            raise RecipeError("A search needs a configuration file (or --resume RUN).")
        config = load_config(config_path)
    problems = load_problems(config)
    compute_device = resolve_device(device)
    if not resume:
        write_run_file(run_dir, config, problems, str(compute_device))
    if ray_settings is not None:
        from mergekit_ext.evo.ray_backend import RayBackend

        backend = RayBackend(config, ray_settings, device)
    else:
        backend = make_backend(config.backend, config.search_space, config.generation, compute_device,
                               parse_dtype(config.dtype), config.candidates_per_batch)
    parents_path = run_dir / PARENTS_FILE
    if not parents_path.is_file():
        parents = evaluate_parents(config, backend, problems)
        parents_path.write_text(json.dumps(parents, indent=2) + "\n", encoding="utf-8")
    search = Search(config, run_dir, backend, problems, progress)
    front = search.run(resume=resume)

    from mergekit_ext.evo.report import plot_run

    plot_run(run_dir)
    return front


def parent_genomes(config: EvoConfig) -> dict[str, Genome]:
    """Return genomes that reproduce the base (all weights 0) and each source (its weights 1, density 1)."""
    space = config.search_space
    weights_per_model = space.weights_per_model
    parents = {}
    for index in [None, *range(len(space.models))]:
        genes = [0.0] * (len(space.models) * weights_per_model)
        if index is not None:
            genes[index * weights_per_model : (index + 1) * weights_per_model] = [1.0] * weights_per_model
        if space.density_genes:
            genes += [1.0] * len(space.models)
        parents["base" if index is None else f"source_{index}"] = space.decode(genes)
    return parents


def evaluate_parents(config: EvoConfig, backend, problems: list[MathProblem]) -> dict[str, dict]:
    """Evaluate the parent models on the search problems, for the report's reference points."""
    genomes = parent_genomes(config)
    results = backend.evaluate(list(genomes.values()), problems)
    paths = [config.search_space.base_model, *config.search_space.models]
    return {
        name: {"label": Path(path).name, "path": path, "accuracy": result.accuracy,
               "mean_tokens": result.mean_tokens, "truncated": result.truncated}
        for (name, result), path in zip(zip(genomes, results), paths)
    }


def evaluate_genomes(
    config: EvoConfig,
    genomes: list[Genome],
    problems: list[MathProblem],
    device: str = "auto",
    progress: CandidateProgress | None = None,
) -> list[CandidateResult]:
    """Evaluate genomes on problems with the configured backend (no archive)."""
    backend = make_backend(config.backend, config.search_space, config.generation, resolve_device(device),
                           parse_dtype(config.dtype), config.candidates_per_batch)
    results: list[CandidateResult] = []
    step = getattr(backend, "candidates_per_batch", 1)
    for start in range(0, len(genomes), step):
        results.extend(backend.evaluate(genomes[start : start + step], problems))
        if progress is not None:
            progress(len(results), len(genomes))
    return results


def grid_genomes(config: EvoConfig, points: int = 11) -> list[Genome]:
    """Return the global-weight grid w = 0, 1/(points-1), ..., 1 (one source, one gene)."""
    space = config.search_space
    if space.num_genes != 1:
        raise RecipeError(f"A weight grid needs a one-gene search space; this one has {space.num_genes} genes.")
    lower, upper = space.weight_bounds
    return [space.decode([round(lower + (upper - lower) * i / (points - 1), 10)]) for i in range(points)]


def torch_threads(count: int | None) -> None:
    if count is not None:
        torch.set_num_threads(count)


def run_subset(
    config_path: Path,
    pool: str,
    k: int,
    strategy: str,
    output: Path,
    exclude: list[str] | None = None,
    grid_points: int = 11,
    device: str = "auto",
    seed: int = 0,
    progress: CandidateProgress | None = None,
):
    """Evaluate the weight grid on the pool, select k items and write the subset file."""
    import numpy as np

    from mergekit_ext.evo.subset import build_report, exclude_overlap

    config = load_config(config_path)
    problems, excluded = exclude_overlap(load_benchmark(pool), exclude or [])
    genomes = grid_genomes(config, grid_points)
    results = evaluate_genomes(config, genomes, problems, device, progress)
    correct = np.array([[item.correct for item in result.items] for result in results], dtype=float).T
    lengths = np.array([[item.num_tokens for item in result.items] for result in results], dtype=float).T
    report = build_report(correct, lengths, problems, pool, [g.genes[0] for g in genomes], k, strategy, excluded, seed)
    report.write(output)
    grid_path = Path(output).with_suffix(".grid.json")
    grid_path.write_text(json.dumps({
        "grid": [g.genes[0] for g in genomes],
        "ids": [problem.id for problem in problems],
        "correct": correct.astype(int).tolist(),
        "tokens": lengths.astype(int).tolist(),
    }) + "\n", encoding="utf-8")
    return report


def evaluate_front_on(
    run_dir: Path, problems_source: str, device: str = "auto", limit: int | None = None,
    progress: CandidateProgress | None = None,
) -> dict:
    """Measure the parents and every front member of a run on other problems (for example a test split)."""
    from mergekit_ext.evo.archive import Archive
    from mergekit_ext.evo.search import ARCHIVE_FILE

    run_dir = Path(run_dir)
    stored = json.loads((run_dir / RUN_FILE).read_text(encoding="utf-8"))
    config = parse_config(stored["config"], source=str(run_dir / RUN_FILE))
    problems = load_benchmark(problems_source, limit=limit)
    front = Archive(run_dir / ARCHIVE_FILE).front(config.search.accuracy_floor)
    parents = parent_genomes(config)
    genomes = list(parents.values()) + [config.search_space.decode(entry.genes) for entry in front]
    results = evaluate_genomes(config, genomes, problems, device, progress)
    rows = []
    names = list(parents) + [f"front-{index:02d}" for index in range(len(front))]
    for name, genome, result in zip(names, genomes, results):
        rows.append({"name": name, "genes": list(genome.genes), "accuracy": result.accuracy,
                     "mean_tokens": result.mean_tokens, "truncated": result.truncated})
    report = {"problems": problems_source, "count": len(problems), "rows": rows}
    (run_dir / "test_evaluation.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return report


def closest_to_target(report: dict, max_length_ratio: float = 0.5, max_accuracy_drop: float = 0.01) -> dict | None:
    """Return the front row closest to `tokens <= ratio * base tokens` at `accuracy >= base - drop`.

    A row meeting both wins by accuracy; otherwise the row with the smallest
    summed shortfall (length ratio above the target plus accuracy below it).
    """
    rows = {row["name"]: row for row in report["rows"]}
    base = rows["base"]
    candidates = [row for row in report["rows"] if row["name"].startswith("front-")]
    if not candidates:
        return None

    def shortfall(row: dict) -> float:
        ratio = row["mean_tokens"] / base["mean_tokens"] if base["mean_tokens"] else 0.0
        return max(0.0, ratio - max_length_ratio) + max(0.0, base["accuracy"] - max_accuracy_drop - row["accuracy"])

    return min(candidates, key=lambda row: (shortfall(row), -row["accuracy"]))


def measure_agreement(
    config: EvoConfig, genomes: list[Genome], problems: list[MathProblem], device: str = "auto"
) -> dict:
    """Compare greedy tokens of the population backend with the sequential backend on the same candidates."""
    from mergekit_ext.evo.backends import PopulationBackend, SequentialBackend

    compute_device = resolve_device(device)
    dtype = parse_dtype(config.dtype)
    sequential = SequentialBackend(config.search_space, config.generation, compute_device, dtype)
    sequential_outputs = sequential.generate(genomes, problems)
    del sequential
    population = PopulationBackend(config.search_space, config.generation, compute_device, dtype,
                                   config.candidates_per_batch)
    population_outputs = population.generate(genomes, problems)
    same_sequence = 0
    matching_tokens = 0
    compared_tokens = 0
    total = 0
    for left, right in zip(sequential_outputs, population_outputs):
        for a, b in zip(left, right):
            total += 1
            same_sequence += a.token_ids == b.token_ids
            # Token agreement: matching positions up to the first difference, over the longer output.
            prefix = 0
            for x, y in zip(a.token_ids, b.token_ids):
                if x != y:
                    break
                prefix += 1
            matching_tokens += prefix
            compared_tokens += max(len(a.token_ids), len(b.token_ids))
    sequential_results = [score(problems, outputs) for outputs in sequential_outputs]
    population_results = [score(problems, outputs) for outputs in population_outputs]
    same_verdict = sum(
        a.correct == b.correct for left, right in zip(sequential_results, population_results)
        for a, b in zip(left.items, right.items)
    )
    return {
        "dtype": config.dtype,
        "items": total,
        "identical_outputs": same_sequence / max(1, total),
        "token_agreement": matching_tokens / max(1, compared_tokens),
        "same_verdict": same_verdict / max(1, total),
        "sequential": [(r.accuracy, r.mean_tokens) for r in sequential_results],
        "population": [(r.accuracy, r.mean_tokens) for r in population_results],
    }
