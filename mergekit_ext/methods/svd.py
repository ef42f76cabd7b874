"""Singular value helpers for the subspace merges: truncation and polar factor."""

from __future__ import annotations

import torch


def truncated_svd(
    matrix: torch.Tensor, rank: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return the top-rank factors u (m x rank), s (rank), vh (rank x n) of a thin SVD."""
    u, s, vh = torch.linalg.svd(matrix.float(), full_matrices=False)
    return u[:, :rank], s[:rank], vh[:rank, :]


# The Gram route squares the condition number of A. Below this ratio of the smallest to
# the largest eigenvalue of AᵀA (a condition number of A above 10⁴), the SVD is used.
GRAM_EIGENVALUE_RATIO = 1e-8


def polar_factor(matrix: torch.Tensor) -> torch.Tensor:
    """Return the nearest matrix with orthonormal columns (Frobenius norm): P Q^T of A = P S Q^T.

    Needs rows >= columns; for a wide matrix, pass its transpose. For a well-conditioned
    A the factor is computed as A (AᵀA)^(-1/2), with AᵀA and its eigendecomposition in
    float64: the same matrix as P Q^T, in half the time of the SVD of a tall A. A
    (nearly) rank-deficient A goes through the SVD.
    """
    matrix64 = matrix.double()
    eigenvalues, eigenvectors = torch.linalg.eigh(matrix64.T @ matrix64)
    if float(eigenvalues[0]) > float(eigenvalues[-1]) * GRAM_EIGENVALUE_RATIO:
        inverse_root = (eigenvectors * eigenvalues.rsqrt()) @ eigenvectors.T
        return matrix @ inverse_root.to(matrix.dtype)
    p, _, qh = torch.linalg.svd(matrix, full_matrices=False)
    return p @ qh
