"""Singular value helpers for the subspace merges: truncation and polar factor."""

from __future__ import annotations

import torch


def truncated_svd(
    matrix: torch.Tensor, rank: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return the top-rank factors u (m x rank), s (rank), vh (rank x n) of a thin SVD."""
    u, s, vh = torch.linalg.svd(matrix.float(), full_matrices=False)
    return u[:, :rank], s[:rank], vh[:rank, :]


def polar_factor(matrix: torch.Tensor) -> torch.Tensor:
    """Return the nearest matrix with orthonormal columns (Frobenius norm): P Q^T of A = P S Q^T.

    Needs rows >= columns; for a wide matrix, pass its transpose.
    """
    p, _, qh = torch.linalg.svd(matrix, full_matrices=False)
    return p @ qh
