"""Body of a Ray evaluation actor: one in-process fitness backend, built once.

The actor builds the backend named in the configuration (`sequential` or
`population`), so the base weights and task vectors stay resident on its device
between candidates. It receives genes, not genomes, and returns the same
`CandidateResult` the in-process backend would.
"""

from __future__ import annotations

import logging
import os
import time

import torch

from mergekit_ext.evo.backends import make_backend, parse_dtype
from mergekit_ext.evo.config import EvoConfig
from mergekit_ext.evo.data import MathProblem
from mergekit_ext.evo.fitness import CandidateResult

logger = logging.getLogger(__name__)


class EvaluationWorker:
    """Evaluate candidates with a resident model; wrapped with `ray.remote` by the Ray backend."""

    def __init__(self, config: EvoConfig, device: str, threads: int) -> None:
        started = time.perf_counter()
        torch.set_num_threads(threads)
        self.config = config
        self.device = torch.device(device)
        self.backend = make_backend(
            config.backend, config.search_space, config.generation, self.device, parse_dtype(config.dtype),
            config.candidates_per_batch,
        )  # fmt: skip
        self.load_seconds = time.perf_counter() - started

    def describe(self) -> dict[str, object]:
        """Return the process id, device and model load time (also a readiness check)."""
        return {"pid": os.getpid(), "device": str(self.device), "load_seconds": round(self.load_seconds, 3)}

    def evaluate(
        self, genes: list[tuple[float, ...]], problems: list[MathProblem]
    ) -> tuple[list[CandidateResult], float]:
        """Return the results of the candidates with these genes and the seconds the evaluation took."""
        started = time.perf_counter()
        genomes = [self.config.search_space.decode(row) for row in genes]
        results = self.backend.evaluate(genomes, problems)
        return results, time.perf_counter() - started
