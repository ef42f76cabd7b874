"""The data-free MASS router: residual norms against task subspaces, then task selection.

MASS (Crisostomi et al., "MoErging through Adaptive Subspace Selection", ICLR 2026)
routes a sample by the activation z entering the first MLP linear of one block of the
shared model. Task i owns the subspace spanned by the k right singular vectors Vᵢ of
its task vector of that same weight; a small residual rᵢ(z) = ‖z − VᵢᵀVᵢz‖₂ means that
z lies in the input space the task changed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

RoutingMode = Literal["topk", "top1"]

# The unbiased standard deviation is stabilized by this constant before dividing.
STANDARDIZE_EPSILON = 1e-6


@dataclass(frozen=True)
class RouterSettings:
    """Selection rule: softmax temperature τ, threshold η, at most `top_k` tasks, mode."""

    temperature: float = 1.0
    threshold: float = 0.2
    top_k: int = 3
    mode: RoutingMode = "topk"


@dataclass(frozen=True)
class RoutingDecision:
    """Router output for a batch: residuals and weights (batch × tasks) and each sample's task set."""

    residuals: torch.Tensor
    weights: torch.Tensor
    task_sets: list[tuple[int, ...]]


def residual_norms(features: torch.Tensor, bases: Sequence[torch.Tensor]) -> torch.Tensor:
    """Return rᵢ(z) = ‖z − VᵢᵀVᵢz‖₂ for a batch z (batch × n) and row-orthonormal Vᵢ (kᵢ × n).

    Returns a (batch × tasks) float32 tensor. The residual is computed from the
    projection norm, ‖z‖² − ‖Vᵢz‖², clamped at zero against rounding.
    """
    z = features.to(torch.float32)
    squared_norm = (z * z).sum(dim=1)
    columns = []
    for basis in bases:
        projection = z @ basis.to(device=z.device, dtype=torch.float32).T
        columns.append((squared_norm - (projection * projection).sum(dim=1)).clamp_min(0.0).sqrt())
    return torch.stack(columns, dim=1)


def routing_weights(residuals: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Return w = softmax(standardize(−r) / τ) per row, standardizing over tasks (unbiased std)."""
    negative = -residuals.to(torch.float32)
    if negative.shape[1] < 2:
        return torch.ones_like(negative)
    centered = negative - negative.mean(dim=1, keepdim=True)
    standardized = centered / (negative.std(dim=1, unbiased=True, keepdim=True) + STANDARDIZE_EPSILON)
    return torch.softmax(standardized / temperature, dim=1)


def select_tasks(weights: torch.Tensor, settings: RouterSettings) -> list[tuple[int, ...]]:
    """Return each sample's task set Ω as sorted task indices.

    topk: Ω = {i : wᵢ > η}, cut to the `top_k` largest weights, or {argmax w} when empty.
    top1: Ω = {argmax w}.
    """
    task_sets: list[tuple[int, ...]] = []
    for row in weights:
        best = int(torch.argmax(row))
        if settings.mode == "top1":
            task_sets.append((best,))
            continue
        above = torch.nonzero(row > settings.threshold).flatten().tolist()
        if not above:
            task_sets.append((best,))
            continue
        above.sort(key=lambda index: float(row[index]), reverse=True)
        task_sets.append(tuple(sorted(above[: settings.top_k])))
    return task_sets


def route(features: torch.Tensor, bases: Sequence[torch.Tensor], settings: RouterSettings) -> RoutingDecision:
    """Route a batch of router features against the task bases."""
    residuals = residual_norms(features, bases)
    weights = routing_weights(residuals, settings.temperature)
    return RoutingDecision(residuals=residuals, weights=weights, task_sets=select_tasks(weights, settings))
