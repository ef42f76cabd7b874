"""Fitness evaluation on Ray actors: one actor per GPU (or CPU slot), each with a resident model.

Candidates go to whichever actor is free, so a slow candidate never delays the
others inside a generation. The search loop still waits for the whole
population at the end of each generation, because pymoo's NSGA-II, SMS-EMOA and
AGE-MOEA are driven generation by generation through ask and tell.

`evaluate_in_order` yields every candidate in the order given, each as soon as
it and all before it are done. The search archives each one at once, so the
archive has the same lines in the same order as with the in-process backends,
and a stopped driver loses only the candidates still in flight.

Faults: an actor process that dies is restarted by Ray (`max_restarts`) and its
candidates are sent again; an exception inside an evaluation is retried the
same way. A candidate that fails `max_attempts` times is returned as failed,
with the error and the worst objectives, and the search goes on.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass

from mergekit_ext.errors import MergekitExtError, RecipeError
from mergekit_ext.evo.backends import CandidateProgress
from mergekit_ext.evo.config import EvoConfig
from mergekit_ext.evo.data import MathProblem
from mergekit_ext.evo.fitness import CandidateResult
from mergekit_ext.evo.genome import Genome
from mergekit_ext.evo.ray_cluster import ActorPlan, RaySettings, connect, import_ray, plan_actors
from mergekit_ext.evo.ray_worker import EvaluationWorker

logger = logging.getLogger(__name__)

# Wait between readiness checks of an actor that Ray is restarting.
PROBE_INTERVAL_SECONDS = 0.2


class EvaluationFailedError(MergekitExtError):
    """A candidate failed on every attempt the Ray backend allows."""


@dataclass(frozen=True)
class EvaluatedCandidate:
    """One finished candidate: its result, or the worst objectives and the error when every attempt failed."""

    genome: Genome
    result: CandidateResult
    seconds: float
    error: str | None = None


@dataclass
class _Task:
    """Candidates sent to one actor in one call, with the failures so far."""

    index: int
    genomes: list[Genome]
    attempts: int = 0


def failed_result(problems: list[MathProblem], max_new_tokens: int) -> CandidateResult:
    """Return the worst objectives: no item correct, every output at the token cap."""
    return CandidateResult(accuracy=0.0, mean_tokens=float(max_new_tokens), truncated=len(problems), items=())


class RayBackend:
    """Dispatch candidates to Ray actors that each run the configuration's in-process backend."""

    def __init__(
        self,
        config: EvoConfig,
        settings: RaySettings | None = None,
        device: str = "auto",
        worker_class: type = EvaluationWorker,
    ) -> None:
        self.config = config
        self.settings = settings or RaySettings()
        self.started_ray = connect(self.settings)
        self.ray = import_ray(local_cluster=False)
        self.plan: ActorPlan = plan_actors(self.settings, device, self.ray.cluster_resources())
        # The population backend decodes `candidates_per_batch` candidates in one batch. The
        # in-process search groups them the same way, which keeps the numerics identical.
        self.candidates_per_task = config.candidates_per_batch if config.backend == "population" else 1
        # Read by callers that evaluate in chunks (`Search` without `evaluate_in_order`, the runner).
        self.candidates_per_batch = self.candidates_per_task * self.plan.num_actors
        remote_class = self.ray.remote(worker_class).options(
            num_cpus=self.plan.num_cpus,
            num_gpus=self.plan.num_gpus,
            max_restarts=self.settings.max_restarts,
            max_task_retries=0,  # retries are made here, so that they are logged and bounded per candidate
        )
        self.actors = [
            remote_class.remote(config, self.plan.device, self.plan.num_cpus) for _ in range(self.plan.num_actors)
        ]
        self.deaths = [0] * len(self.actors)
        # Actors that died and are not yet known to be up again; calls to them fail until Ray has restarted them.
        self.restarting: set[int] = set()
        self._wait_until_ready()

    def _wait_until_ready(self) -> None:
        from ray.exceptions import RayActorError

        try:
            descriptions = self.ray.get([actor.describe.remote() for actor in self.actors])
        except RayActorError as error:
            self.close()
            raise RecipeError(
                f"A Ray evaluation actor failed while loading {self.config.search_space.base_model} and its "
                f"sources; the models must be readable at the same path on every node. Cause: {error}"
            ) from error
        logger.info(
            "Ray backend ready: %d actors on %s (%s backend each), model load %s s",
            len(self.actors), self.plan.device, self.config.backend,
            ", ".join(str(description["load_seconds"]) for description in descriptions),
        )  # fmt: skip

    # --- evaluation --------------------------------------------------------------------------

    def evaluate_in_order(self, genomes: list[Genome], problems: list[MathProblem]) -> Iterator[EvaluatedCandidate]:
        """Evaluate genomes on free actors; yield each in input order once it and those before it are done."""
        from ray.exceptions import RayActorError, RayTaskError

        ray = self.ray
        problems_reference = ray.put(problems)
        step = self.candidates_per_task
        starts = range(0, len(genomes), step)
        tasks = [_Task(index, genomes[start : start + step]) for index, start in enumerate(starts)]
        waiting = deque(tasks)
        free_actors = deque(index for index in self._live_actors() if index not in self.restarting)
        # Object reference -> (task, actor index). The task is None for a readiness probe of a restarted actor.
        in_flight: dict = {}
        for actor_index in self.restarting:
            in_flight[self.actors[actor_index].describe.remote()] = (None, actor_index)
        finished: dict[int, list[EvaluatedCandidate]] = {}
        next_index = 0

        def dispatch() -> None:
            while waiting and free_actors:
                task, actor_index = waiting.popleft(), free_actors.popleft()
                genes = [genome.genes for genome in task.genomes]
                in_flight[self.actors[actor_index].evaluate.remote(genes, problems_reference)] = (task, actor_index)

        try:
            while next_index < len(tasks):
                dispatch()
                if not in_flight:
                    raise EvaluationFailedError(
                        f"Every Ray evaluation actor died more than {self.settings.max_restarts} times; "
                        f"{len(waiting)} candidate batches are left. Check the actor logs (ray logs) for the cause."
                    )
                ready, _ = ray.wait(list(in_flight), num_returns=1)
                for reference in ready:
                    task, actor_index = in_flight.pop(reference)
                    try:
                        output = ray.get(reference)
                    except RayActorError as error:
                        if task is None:
                            self._probe_failed(actor_index, error, in_flight)
                        else:
                            self._actor_died(actor_index, task, error, in_flight)
                            self._retry_or_fail(task, f"actor died: {error}", waiting, finished, problems)
                        continue
                    except RayTaskError as error:
                        free_actors.append(actor_index)
                        self._retry_or_fail(task, f"{type(error.cause).__name__}: {error.cause}", waiting, finished,
                                            problems)  # fmt: skip
                        continue
                    free_actors.append(actor_index)
                    if task is None:
                        self.restarting.discard(actor_index)
                        logger.info("Ray actor %d is up again (pid %s)", actor_index, output["pid"])
                        continue
                    results, seconds = output
                    finished[task.index] = [
                        EvaluatedCandidate(genome, result, seconds / len(task.genomes))
                        for genome, result in zip(task.genomes, results, strict=True)
                    ]
                # Free actors get new work before anything is yielded, so they stay busy while the
                # caller writes the archive.
                dispatch()
                while next_index in finished:
                    yield from finished.pop(next_index)
                    next_index += 1
        finally:
            # A stopped caller leaves calls queued on the actors; cancel them so later batches are not delayed.
            for reference, (task, _) in in_flight.items():
                if task is not None:
                    ray.cancel(reference)

    def _live_actors(self) -> list[int]:
        return [index for index in range(len(self.actors)) if self.deaths[index] <= self.settings.max_restarts]

    def _actor_died(self, actor_index: int, task: _Task, error: Exception, in_flight: dict) -> None:
        """Count the death of an actor and probe it until Ray has restarted it (calls fail meanwhile)."""
        self.deaths[actor_index] += 1
        keys = ", ".join(genome.key() for genome in task.genomes)
        if self.deaths[actor_index] > self.settings.max_restarts:
            self.restarting.discard(actor_index)
            logger.error("Ray actor %d died for good (%d deaths) while evaluating candidate %s: %s",
                         actor_index, self.deaths[actor_index], keys, error)  # fmt: skip
            return
        logger.warning("Ray actor %d died while evaluating candidate %s; Ray restarts it (restart %d of %d)",
                       actor_index, keys, self.deaths[actor_index], self.settings.max_restarts)  # fmt: skip
        self.restarting.add(actor_index)
        in_flight[self.actors[actor_index].describe.remote()] = (None, actor_index)

    def _probe_failed(self, actor_index: int, error: Exception, in_flight: dict) -> None:
        from ray.exceptions import ActorUnavailableError

        if not isinstance(error, ActorUnavailableError):
            # The restarted process died too (for example while loading the models).
            self.deaths[actor_index] += 1
            if self.deaths[actor_index] > self.settings.max_restarts:
                self.restarting.discard(actor_index)
                logger.error("Ray actor %d died for good (%d deaths): %s", actor_index, self.deaths[actor_index], error)
                return
        time.sleep(PROBE_INTERVAL_SECONDS)
        in_flight[self.actors[actor_index].describe.remote()] = (None, actor_index)

    def _retry_or_fail(
        self,
        task: _Task,
        error: str,
        waiting: deque,
        finished: dict[int, list[EvaluatedCandidate]],
        problems: list[MathProblem],
    ) -> None:
        task.attempts += 1
        keys = ", ".join(genome.key() for genome in task.genomes)
        if task.attempts < self.settings.max_attempts:
            logger.warning("Candidate %s failed (attempt %d of %d), retrying: %s",
                           keys, task.attempts, self.settings.max_attempts, error)  # fmt: skip
            # Retried first, so that the in-order output is not held back by it longer than needed.
            waiting.appendleft(task)
            return
        logger.error("Candidate %s failed %d times; archived as failed: %s", keys, task.attempts, error)
        worst = failed_result(problems, self.config.generation.max_new_tokens)
        finished[task.index] = [EvaluatedCandidate(genome, worst, 0.0, error) for genome in task.genomes]

    def evaluate(
        self, genomes: list[Genome], problems: list[MathProblem], progress: CandidateProgress | None = None
    ) -> list[CandidateResult]:
        """Evaluate genomes and return the results in input order; raise when a candidate failed on every attempt."""
        results = []
        for done, evaluated in enumerate(self.evaluate_in_order(genomes, problems), start=1):
            if evaluated.error is not None:
                raise EvaluationFailedError(
                    f"Candidate {evaluated.genome.key()} failed on all {self.settings.max_attempts} attempts: "
                    f"{evaluated.error}"
                )
            results.append(evaluated.result)
            if progress is not None:
                progress(done, len(genomes))
        return results

    # --- lifetime ----------------------------------------------------------------------------

    def close(self) -> None:
        """Stop the actors, and the local cluster when this backend started it."""
        for actor in self.actors:
            self.ray.kill(actor, no_restart=True)
        self.actors = []
        if self.started_ray:
            self.ray.shutdown()
            self.started_ray = False

    def __enter__(self) -> RayBackend:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
