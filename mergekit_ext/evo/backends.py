"""Fitness backends: evaluate a list of genomes in memory, without writing checkpoints.

- `SequentialBackend`: one resident model; per candidate the merged weights are
  written into it with the shared merge kernels, then the problems are decoded.
- `PopulationBackend` (linear genomes only): the base weights A and the task
  vectors D_j stay resident, and every batch row carries its own coefficients,
  so many candidates decode in one batch (`mixing.py`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Protocol

import torch

from mergekit_ext.errors import RecipeError
from mergekit_ext.evo.data import MathProblem
from mergekit_ext.evo.fitness import CandidateResult, score
from mergekit_ext.evo.generation import Generation, GenerationSettings, format_prompt, generate_greedy
from mergekit_ext.evo.genome import Genome, SearchSpace
from mergekit_ext.evo.merge_memory import ResidentSources, write_genome_into

logger = logging.getLogger(__name__)

# progress(candidates done, candidates total)
CandidateProgress = Callable[[int, int], None]


class FitnessBackend(Protocol):
    def evaluate(
        self, genomes: list[Genome], problems: list[MathProblem], progress: CandidateProgress | None = None
    ) -> list[CandidateResult]: ...


def parse_dtype(name: str) -> torch.dtype:
    table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in table:
        raise RecipeError(f"Unsupported dtype {name!r}; use one of {', '.join(table)}.")
    return table[name]


def load_model(path: str, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    return model.to(device).eval()


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


class SequentialBackend:
    """Merge each candidate into one resident model, then decode the problem batch."""

    def __init__(
        self, space: SearchSpace, settings: GenerationSettings, device: torch.device, dtype: torch.dtype
    ) -> None:
        self.space = space
        self.settings = settings
        self.tokenizer = load_tokenizer(space.base_model)
        self.model = load_model(space.base_model, device, dtype)
        self.resident = ResidentSources(space, device, dtype=dtype)

    def generate(
        self, genomes: list[Genome], problems: list[MathProblem], progress: CandidateProgress | None = None
    ) -> list[list[Generation]]:
        prompts = [format_prompt(self.tokenizer, problem.question, self.settings) for problem in problems]
        outputs = []
        for done, genome in enumerate(genomes, start=1):
            started = time.perf_counter()
            write_genome_into(self.model, genome, self.resident)
            outputs.append(generate_greedy(self.model, self.tokenizer, prompts, self.settings))
            logger.debug("Candidate %s decoded in %.2f s", genome.key(), time.perf_counter() - started)
            if progress is not None:
                progress(done, len(genomes))
        return outputs

    def evaluate(
        self, genomes: list[Genome], problems: list[MathProblem], progress: CandidateProgress | None = None
    ) -> list[CandidateResult]:
        return [score(problems, generations) for generations in self.generate(genomes, problems, progress)]


class PopulationBackend:
    """Decode many linear candidates at once: each batch row has its own merge coefficients."""

    def __init__(
        self,
        space: SearchSpace,
        settings: GenerationSettings,
        device: torch.device,
        dtype: torch.dtype,
        candidates_per_batch: int = 8,
    ) -> None:
        from mergekit_ext.evo.mixing import MixingModel

        if not space.is_linear():
            raise RecipeError(
                f"The population backend needs a linear method (task_arithmetic or linear), not {space.method}; "
                "use backend: sequential."
            )
        self.space = space
        self.settings = settings
        self.tokenizer = load_tokenizer(space.base_model)
        self.mixing = MixingModel(space, device, dtype)
        self.candidates_per_batch = candidates_per_batch

    def evaluate(
        self, genomes: list[Genome], problems: list[MathProblem], progress: CandidateProgress | None = None
    ) -> list[CandidateResult]:
        return [score(problems, generations) for generations in self.generate(genomes, problems, progress)]

    def generate(
        self, genomes: list[Genome], problems: list[MathProblem], progress: CandidateProgress | None = None
    ) -> list[list[Generation]]:
        prompts = [format_prompt(self.tokenizer, problem.question, self.settings) for problem in problems]
        results: list[list[Generation]] = []
        for start in range(0, len(genomes), self.candidates_per_batch):
            chunk = genomes[start : start + self.candidates_per_batch]
            rows = [self.mixing.coefficients(genome) for genome in chunk for _ in problems]
            coefficient_rows = torch.stack(rows)
            all_prompts = prompts * len(chunk)
            settings = self.settings.model_copy(update={"batch_size": self.settings.batch_size * len(chunk)})

            def before_batch(first: int, last: int) -> None:
                self.mixing.set_rows(coefficient_rows[first:last])

            generations = generate_greedy(self.mixing.model, self.tokenizer, all_prompts, settings, before_batch)
            for index in range(len(chunk)):
                results.append(generations[index * len(problems) : (index + 1) * len(problems)])
            if progress is not None:
                progress(len(results), len(genomes))
        return results


def make_backend(
    name: str,
    space: SearchSpace,
    settings: GenerationSettings,
    device: torch.device,
    dtype: torch.dtype,
    candidates_per_batch: int = 8,
) -> FitnessBackend:
    if name == "sequential":
        return SequentialBackend(space, settings, device, dtype)
    if name == "population":
        return PopulationBackend(space, settings, device, dtype, candidates_per_batch)
    raise RecipeError(f"Unknown fitness backend {name!r}; use sequential or population.")
