"""Subset sampling: pick the pool problems that best separate merge weights.

A weight grid (w = 0, 0.1, ..., 1) is evaluated on the pool, giving a
correctness matrix C (items x grid points). Strategies:

- entropy: p_i = mean_j C_ij, H_i = -p log2 p - (1-p) log2 (1-p); keep the k
  highest H (the Evo-L2S subset rule; ties keep pool order).
- random: k items drawn without replacement (seeded).
- disagreement: items where the two ends of the grid (the parents) disagree
  first, then by entropy.

Validation: the Spearman correlation between the grid's accuracy ranking on the
subset and on the whole pool (scipy.stats.spearmanr).
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from scipy.stats import spearmanr

from mergekit_ext.errors import RecipeError
from mergekit_ext.evo.data import MathProblem, load_benchmark

logger = logging.getLogger(__name__)

Strategy = Literal["entropy", "random", "disagreement"]


def binary_entropy(p: np.ndarray) -> np.ndarray:
    """Return H(p) in bits, with H(0) = H(1) = 0."""
    p = np.asarray(p, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = -p * np.log2(p) - (1 - p) * np.log2(1 - p)
    return np.nan_to_num(terms, nan=0.0)


def select_items(correct: np.ndarray, k: int, strategy: Strategy, seed: int = 0) -> np.ndarray:
    """Return the indices of the k selected items (sorted by selection priority)."""
    correct = np.asarray(correct, dtype=np.float64)
    if k > correct.shape[0]:
        raise RecipeError(f"Subset size {k} exceeds the pool size {correct.shape[0]}; lower k.")
    entropy = binary_entropy(correct.mean(axis=1))
    if strategy == "entropy":
        # A stable sort on -H keeps pool order among equal entropies.
        return np.argsort(-entropy, kind="stable")[:k]
    if strategy == "random":
        return np.random.default_rng(seed).choice(correct.shape[0], size=k, replace=False)
    if strategy == "disagreement":
        parents_disagree = np.abs(correct[:, 0] - correct[:, -1])
        return np.lexsort((-entropy, -parents_disagree))[:k]
    raise RecipeError(f"Unknown subset strategy {strategy!r}; use entropy, random or disagreement.")


def spearman_agreement(values: np.ndarray, indices: np.ndarray) -> float:
    """Spearman correlation of per-grid-point means on the subset against the whole pool.

    `values` is items x grid points (correctness or lengths). Returns NaN when
    either ranking is constant.
    """
    values = np.asarray(values, dtype=np.float64)
    pool = values.mean(axis=0)
    subset = values[indices].mean(axis=0)
    if np.ptp(pool) == 0 or np.ptp(subset) == 0:
        return float("nan")
    return float(spearmanr(subset, pool).statistic)


def normalize_question(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().lower()


def exclude_overlap(pool: list[MathProblem], exclude: list[str]) -> tuple[list[MathProblem], int]:
    """Drop pool items whose question (whitespace and case normalized) is in an excluded set."""
    excluded_questions: set[str] = set()
    for name in exclude:
        excluded_questions.update(normalize_question(problem.question) for problem in load_benchmark(name))
    kept = [problem for problem in pool if normalize_question(problem.question) not in excluded_questions]
    return kept, len(pool) - len(kept)


@dataclass(frozen=True)
class SubsetReport:
    """Selected ids and the validation of the selection."""

    ids: list[str]
    strategy: str
    k: int
    pool: str
    pool_size: int
    excluded: int
    grid: list[float]
    spearman_accuracy: float
    spearman_length: float
    random_spearman_accuracy_mean: float
    random_spearman_accuracy_std: float
    pool_accuracy: list[float]
    subset_accuracy: list[float]

    def write(self, path: Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=2) + "\n", encoding="utf-8")


def build_report(
    correct: np.ndarray,
    lengths: np.ndarray,
    pool: list[MathProblem],
    pool_name: str,
    grid: list[float],
    k: int,
    strategy: Strategy,
    excluded: int,
    seed: int = 0,
    random_trials: int = 100,
) -> SubsetReport:
    """Select the subset and compare its agreement with `random_trials` random subsets."""
    indices = select_items(correct, k, strategy, seed)
    random_values = [
        spearman_agreement(correct, select_items(correct, k, "random", seed + trial)) for trial in range(random_trials)
    ]
    random_values = [value for value in random_values if not np.isnan(value)]
    return SubsetReport(
        ids=[pool[index].id for index in indices],
        strategy=strategy,
        k=k,
        pool=pool_name,
        pool_size=len(pool),
        excluded=excluded,
        grid=grid,
        spearman_accuracy=spearman_agreement(correct, indices),
        spearman_length=spearman_agreement(lengths, indices),
        random_spearman_accuracy_mean=float(np.mean(random_values)) if random_values else float("nan"),
        random_spearman_accuracy_std=float(np.std(random_values)) if random_values else float("nan"),
        pool_accuracy=[float(v) for v in np.asarray(correct, dtype=float).mean(axis=0)],
        subset_accuracy=[float(v) for v in np.asarray(correct, dtype=float)[indices].mean(axis=0)],
    )
