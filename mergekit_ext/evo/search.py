"""Multi-objective search over merge genomes with pymoo's ask-and-tell interface.

Objectives (minimized): -accuracy and mean generated tokens. With an accuracy
floor the constraint G = floor - accuracy <= 0 applies (pymoo's feasibility
rule), which keeps the length objective from rewarding empty outputs.

After every generation the algorithm (with its random generator) is written to
`checkpoint` with dill, so `resume` asks the same offspring again and takes
their results from the archive instead of decoding them again.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pymoo.core.problem import Problem
from pymoo.core.sampling import Sampling

from mergekit_ext import __version__
from mergekit_ext.errors import OutputError, RecipeError
from mergekit_ext.evo.archive import Archive, ArchiveEntry, hypervolume
from mergekit_ext.evo.backends import FitnessBackend
from mergekit_ext.evo.config import EvoConfig
from mergekit_ext.evo.data import MathProblem
from mergekit_ext.evo.genome import Genome

logger = logging.getLogger(__name__)

RUN_FILE = "run.json"
ARCHIVE_FILE = "archive.jsonl"
FRONT_FILE = "front.json"
CHECKPOINT_FILE = "checkpoint"
PLOT_FILE = "pareto.png"


@dataclass
class SearchProgress:
    """State reported after each evaluated candidate and each generation."""

    generation: int
    generations: int
    candidates_done: int
    candidates_total: int
    front_size: int
    hypervolume: float


ProgressCallback = Callable[[SearchProgress], None]


class GridSampling(Sampling):
    """Uniform random genes rounded to a grid (distinct points first when the grid is small)."""

    def __init__(self, step: float) -> None:
        super().__init__()
        self.step = step

    def _do(self, problem, n_samples, *args, random_state=None, **kwargs):
        lower, upper = problem.bounds()
        samples = lower + (upper - lower) * random_state.random((n_samples, problem.n_var))
        if self.step > 0:
            samples = np.clip(np.round(samples / self.step) * self.step, lower, upper)
        return np.round(samples, 10)


class MergeProblem(Problem):
    """Vectorized problem: `_evaluate` receives the whole population (n_pop x n_var)."""

    def __init__(self, evaluate_population: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray | None]],
                 lower: np.ndarray, upper: np.ndarray, constrained: bool) -> None:
        super().__init__(n_var=len(lower), n_obj=2, n_ieq_constr=1 if constrained else 0, xl=lower, xu=upper)
        self.evaluate_population = evaluate_population

    def _evaluate(self, x, out, *args, **kwargs):
        objectives, constraints = self.evaluate_population(x)
        out["F"] = objectives
        if constraints is not None:
            out["G"] = constraints


def make_algorithm(config: EvoConfig):
    from pymoo.operators.crossover.sbx import SBX
    from pymoo.operators.mutation.pm import PM

    settings = config.search
    common = dict(
        pop_size=settings.population,
        sampling=GridSampling(settings.initial_grid),
        crossover=SBX(eta=settings.crossover_eta, prob=settings.crossover_probability),
        mutation=PM(eta=settings.mutation_eta),
        eliminate_duplicates=True,
    )
    if settings.algorithm == "nsga2":
        from pymoo.algorithms.moo.nsga2 import NSGA2

        return NSGA2(**common)
    if settings.algorithm == "smsemoa":
        from pymoo.algorithms.moo.sms import SMSEMOA

        return SMSEMOA(**common)
    try:
        from pymoo.algorithms.moo.age import AGEMOEA
    except Exception as error:  # pymoo raises a bare Exception when numba is missing
        raise RecipeError(f"AGE-MOEA needs numba ({error}); run `pip install numba` or use nsga2.") from error
    return AGEMOEA(**common)


class Search:
    """One search run in a run folder; `run()` continues from a checkpoint when resuming."""

    def __init__(self, config: EvoConfig, run_dir: Path, backend: FitnessBackend, problems: list[MathProblem],
                 progress: ProgressCallback | None = None) -> None:
        self.config = config
        self.run_dir = Path(run_dir)
        self.backend = backend
        self.problems = problems
        self.progress = progress
        self.archive = Archive(self.run_dir / ARCHIVE_FILE)
        self.generation = 0
        self.hypervolumes: list[float] = []

    # --- evaluation -----------------------------------------------------------------------

    def evaluate_population(self, genes: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        genomes = [self.config.search_space.decode(row) for row in genes]
        pending: dict[str, Genome] = {}
        for genome in genomes:
            if genome.key() not in self.archive and genome.key() not in pending:
                pending[genome.key()] = genome
        total = len(pending)
        started = time.perf_counter()

        def report(done: int, _total: int) -> None:
            self._report(done, total)

        # Results are stored one backend batch at a time, so that a kill loses at most one batch.
        chunk_size = getattr(self.backend, "candidates_per_batch", 1)
        queue = list(pending.values())
        evaluate_in_order = getattr(self.backend, "evaluate_in_order", None)
        if evaluate_in_order is not None:
            # Distributed backends (ray_backend.py) yield each candidate in queue order as soon as it is done.
            for done, evaluated in enumerate(evaluate_in_order(queue, self.problems), start=1):
                self.archive.add(
                    ArchiveEntry(key=evaluated.genome.key(), genes=evaluated.genome.genes, generation=self.generation,
                                 result=evaluated.result, seconds=evaluated.seconds, error=evaluated.error)
                )
                report(done, total)
            queue = []  # every candidate is archived; the chunked loop below has nothing left
        for start in range(0, len(queue), chunk_size):
            chunk = queue[start : start + chunk_size]
            chunk_started = time.perf_counter()
            results = self.backend.evaluate(chunk, self.problems)
            seconds = (time.perf_counter() - chunk_started) / len(chunk)
            for genome, result in zip(chunk, results, strict=True):
                self.archive.add(
                    ArchiveEntry(key=genome.key(), genes=genome.genes, generation=self.generation, result=result,
                                 seconds=seconds)
                )
            report(start + len(chunk), total)
        logger.info("Generation %d: %d new candidates in %.1f s (%d from the archive)", self.generation, total,
                    time.perf_counter() - started, len(genomes) - total)

        entries = [self.archive.get(genome.key()) for genome in genomes]
        objectives = np.array([entry.objectives() for entry in entries])
        floor = self.config.search.accuracy_floor
        constraints = None
        if floor is not None:
            constraints = np.array([[floor - entry.result.accuracy] for entry in entries])
        return objectives, constraints

    def _report(self, done: int, total: int) -> None:
        if self.progress is None:
            return
        front = self.archive.front(self.config.search.accuracy_floor)
        self.progress(
            SearchProgress(
                generation=self.generation,
                generations=self.config.search.generations,
                candidates_done=done,
                candidates_total=total,
                front_size=len(front),
                hypervolume=hypervolume([entry.objectives() for entry in front], self.config.generation.max_new_tokens),
            )
        )

    # --- run ------------------------------------------------------------------------------

    def run(self, resume: bool = False) -> list[ArchiveEntry]:
        import dill

        checkpoint_path = self.run_dir / CHECKPOINT_FILE
        if resume and checkpoint_path.is_file():
            with checkpoint_path.open("rb") as handle:
                state = dill.load(handle)
            algorithm, self.generation, self.hypervolumes = state["algorithm"], state["generation"], state["hypervolumes"]
            logger.info("Resuming at generation %d with %d archived candidates", self.generation, len(self.archive.entries))
        else:
            algorithm = make_algorithm(self.config)
            lower, upper = self.config.search_space.bounds()
            problem = MergeProblem(self.evaluate_population, lower, upper, self.config.search.accuracy_floor is not None)
            algorithm.setup(problem, termination=("n_gen", self.config.search.generations),
                            seed=self.config.search.seed, verbose=False)
        # The problem's callback belongs to this process, not to the pickled one.
        algorithm.problem.evaluate_population = self.evaluate_population

        from pymoo.core.evaluator import Evaluator

        while algorithm.has_next():
            population = algorithm.ask()
            Evaluator().eval(algorithm.problem, population)
            algorithm.tell(infills=population)
            self.generation += 1
            front = self.archive.front(self.config.search.accuracy_floor)
            self.hypervolumes.append(
                hypervolume([entry.objectives() for entry in front], self.config.generation.max_new_tokens)
            )
            self._write_checkpoint(algorithm, checkpoint_path)
            self._write_front()
            self._report(0, 0)
        return self.archive.front(self.config.search.accuracy_floor)

    def _write_checkpoint(self, algorithm, path: Path) -> None:
        import dill

        problem = algorithm.problem
        callback = problem.evaluate_population
        problem.evaluate_population = None  # the callback references the backend and its models, which must not be pickled
        temporary = path.with_suffix(".tmp")
        try:
            with temporary.open("wb") as handle:
                dill.dump({"algorithm": algorithm, "generation": self.generation,
                           "hypervolumes": self.hypervolumes}, handle)
            os.replace(temporary, path)
        finally:
            problem.evaluate_population = callback

    def _write_front(self) -> None:
        front = self.archive.front(self.config.search.accuracy_floor)
        data = {
            "generation": self.generation,
            "hypervolume_per_generation": self.hypervolumes,
            "members": [
                {
                    "key": entry.key,
                    "genes": list(entry.genes),
                    "gene_names": self.config.search_space.gene_names(),
                    "accuracy": entry.result.accuracy,
                    "mean_tokens": entry.result.mean_tokens,
                    "truncated": entry.result.truncated,
                }
                for entry in front
            ],
        }
        (self.run_dir / FRONT_FILE).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def write_run_file(run_dir: Path, config: EvoConfig, problems: list[MathProblem], device: str) -> None:
    data = {
        "tool_version": __version__,
        "config": json.loads(config.model_dump_json()),
        "device": device,
        "problem_ids": [problem.id for problem in problems],
    }
    (run_dir / RUN_FILE).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def prepare_run_dir(run_dir: Path, resume: bool, force: bool = False) -> None:
    if resume:
        if not (run_dir / RUN_FILE).is_file():
            raise OutputError(f"{run_dir} is not a search run folder ({RUN_FILE} missing); check the --resume path.")
        return
    if run_dir.exists() and any(run_dir.iterdir()) and not force:
        raise OutputError(f"Run folder {run_dir} exists and is not empty; use --resume to continue it or --force.")
    if force and (run_dir / ARCHIVE_FILE).exists():
        for name in (ARCHIVE_FILE, FRONT_FILE, CHECKPOINT_FILE, RUN_FILE, PLOT_FILE):
            (run_dir / name).unlink(missing_ok=True)
    run_dir.mkdir(parents=True, exist_ok=True)
