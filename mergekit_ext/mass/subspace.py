"""Low-rank task subspaces for MASS: factors, randomized SVD, TSV-M over stored factors.

The TSV-M arithmetic itself (polar factors of the concatenated bases, then
U⊥ diag(σ̂) V⊥ᵀ) lives in `mergekit_ext.methods.tsv` and `mergekit_ext.methods.svd`,
shared with the `tsv` merge method. This module adds what MASS needs on top of it.
All math runs in float32.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from mergekit_ext.methods.svd import polar_factor
from mergekit_ext.methods.svd import truncated_svd as full_truncated_svd
from mergekit_ext.methods.tsv import tsv_merge_factors

__all__ = ["LowRankFactors", "polar_factor", "redundancy_filter", "truncated_svd", "tsv_merge"]

SvdMethod = Literal["full", "randomized"]

# Oversampling and power iterations of the randomized SVD (Halko, Martinsson and Tropp
# 2011, section 4); `scripts/bench_mass.py` measures its error against the full SVD.
RANDOMIZED_OVERSAMPLE = 10
RANDOMIZED_POWER_ITERATIONS = 2


@dataclass(frozen=True)
class LowRankFactors:
    """Truncated SVD of one task's 2-D task vector: Δ ≈ u diag(s) vh."""

    u: torch.Tensor  # (m, k), orthonormal columns
    s: torch.Tensor  # (k,), non-increasing
    vh: torch.Tensor  # (k, n), orthonormal rows

    @property
    def rank(self) -> int:
        return int(self.s.numel())

    def dense(self) -> torch.Tensor:
        """Return the rank-k matrix u diag(s) vh."""
        return (self.u * self.s) @ self.vh


def truncated_svd(
    delta: torch.Tensor,
    rank: int,
    *,
    method: SvdMethod = "full",
    seed: int = 0,
) -> LowRankFactors:
    """Return the top-`rank` singular triplets of `delta` in float32.

    `randomized` uses `torch.svd_lowrank` with a generator seeded by `seed`, so the
    result does not depend on the global random state. A sketch that would not be
    much thinner than the matrix falls back to the full SVD.
    """
    if method not in ("full", "randomized"):
        raise ValueError(f"unknown SVD method {method!r}; use 'full' or 'randomized'")
    matrix = delta.to(torch.float32)
    rank = min(rank, *matrix.shape)
    if method == "full" or rank + RANDOMIZED_OVERSAMPLE >= min(matrix.shape) // 2:
        u, s, vh = full_truncated_svd(matrix, rank)
        return LowRankFactors(u.contiguous(), s.contiguous(), vh.contiguous())

    devices = [matrix.device] if matrix.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        u, s, v = torch.svd_lowrank(matrix, q=rank + RANDOMIZED_OVERSAMPLE, niter=RANDOMIZED_POWER_ITERATIONS)
    return LowRankFactors(u[:, :rank].contiguous(), s[:rank].contiguous(), v[:, :rank].T.contiguous())


def tsv_merge(factors: Sequence[LowRankFactors]) -> torch.Tensor:
    """Return the TSV-M task vector U⊥ diag(σ̂) V⊥ᵀ of the given per-task factors.

    Tasks whose singular values are all zero (an unchanged tensor) are left out, because
    their arbitrary singular bases would still rotate the other tasks' bases.
    """
    if not factors:
        raise ValueError("tsv_merge needs at least one task")
    kept = [f for f in factors if f.rank > 0 and bool(torch.any(f.s != 0))]
    if not kept:
        first = factors[0]
        return torch.zeros(first.u.shape[0], first.vh.shape[1], dtype=torch.float32, device=first.u.device)
    if len(kept) == 1:
        # The polar factor of an orthonormal basis is the basis itself.
        return kept[0].dense()
    return tsv_merge_factors([f.u for f in kept], [f.s for f in kept], [f.vh for f in kept])


def frobenius_cosine(first: LowRankFactors, second: LowRankFactors) -> float:
    """Return the cosine ⟨A, B⟩_F / (‖A‖_F ‖B‖_F) of two rank-k matrices from their factors.

    ⟨A, B⟩_F = trace(Aᵀ B) = Σ (diag(s_a) u_aᵀ u_b diag(s_b)) ∘ (vh_a vh_bᵀ), so the dense
    matrices are never formed.
    """
    inner = ((first.s[:, None] * (first.u.T @ second.u) * second.s[None, :]) * (first.vh @ second.vh.T)).sum()
    norms = torch.linalg.vector_norm(first.s) * torch.linalg.vector_norm(second.s)
    if float(norms) == 0.0:
        return 0.0
    return float(inner / norms)


def redundancy_filter(factors: Sequence[LowRankFactors], epsilon: float) -> list[int]:
    """Return the indices of tasks kept by the redundancy filter, in input order.

    A task joins only if the cosine of its rank-k matrix with every task kept before it
    is at most `epsilon`. The first task is always kept.
    """
    kept: list[int] = []
    for index, candidate in enumerate(factors):
        if all(frobenius_cosine(candidate, factors[other]) <= epsilon for other in kept):
            kept.append(index)
    return kept
