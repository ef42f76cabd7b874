"""TSV-M over stored factors, randomized SVD and the redundancy filter."""

from __future__ import annotations

import torch

from mergekit_ext.mass.subspace import (
    LowRankFactors,
    frobenius_cosine,
    polar_factor,
    redundancy_filter,
    truncated_svd,
    tsv_merge,
)


def _low_rank(m: int, n: int, rank: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(m, rank, generator=generator) @ torch.randn(rank, n, generator=generator)


def test_truncated_svd_matches_eckart_young() -> None:
    delta = torch.randn(40, 24, generator=torch.Generator().manual_seed(0))
    factors = truncated_svd(delta, 5)
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    expected = (u[:, :5] * s[:5]) @ vh[:5]
    assert factors.u.shape == (40, 5)
    assert factors.vh.shape == (5, 24)
    torch.testing.assert_close(factors.dense(), expected, atol=1e-5, rtol=1e-5)


def test_tsv_merge_of_one_task_is_its_truncation() -> None:
    delta = torch.randn(30, 20, generator=torch.Generator().manual_seed(1))
    factors = truncated_svd(delta, 4)
    torch.testing.assert_close(tsv_merge([factors]), factors.dense(), atol=1e-5, rtol=1e-5)


def test_polar_factor_has_orthonormal_columns() -> None:
    matrix = torch.randn(50, 12, generator=torch.Generator().manual_seed(2))
    orthogonal = polar_factor(matrix)
    torch.testing.assert_close(orthogonal.T @ orthogonal, torch.eye(12), atol=1e-5, rtol=0)
    # Nearest orthonormal matrix: no other orthonormal Q is closer, e.g. the QR factor.
    q, _ = torch.linalg.qr(matrix)
    assert torch.linalg.norm(matrix - orthogonal) <= torch.linalg.norm(matrix - q) + 1e-5


def test_tsv_merge_matches_dense_formula() -> None:
    deltas = [torch.randn(36, 28, generator=torch.Generator().manual_seed(seed)) for seed in range(3)]
    factors = [truncated_svd(delta, 9) for delta in deltas]
    left = polar_factor(torch.cat([f.u for f in factors], dim=1))
    right = polar_factor(torch.cat([f.vh.T for f in factors], dim=1))
    expected = left @ torch.diag(torch.cat([f.s for f in factors])) @ right.T
    torch.testing.assert_close(tsv_merge(factors), expected, atol=1e-5, rtol=1e-5)


def test_tsv_merge_ignores_unchanged_task() -> None:
    delta = torch.randn(20, 16, generator=torch.Generator().manual_seed(3))
    changed = truncated_svd(delta, 4)
    unchanged = truncated_svd(torch.zeros(20, 16), 4)
    torch.testing.assert_close(tsv_merge([changed, unchanged]), changed.dense(), atol=1e-5, rtol=1e-5)


def test_randomized_svd_recovers_low_rank_matrix() -> None:
    delta = _low_rank(400, 300, 6, seed=4) + 1e-3 * torch.randn(400, 300, generator=torch.Generator().manual_seed(5))
    full = truncated_svd(delta, 6, method="full")
    randomized = truncated_svd(delta, 6, method="randomized", seed=0)
    torch.testing.assert_close(randomized.s, full.s, rtol=1e-3, atol=0)
    relative = torch.linalg.norm(randomized.dense() - full.dense()) / torch.linalg.norm(full.dense())
    assert relative < 1e-3


def test_randomized_svd_is_seeded() -> None:
    delta = torch.randn(300, 200, generator=torch.Generator().manual_seed(6))
    first = truncated_svd(delta, 5, method="randomized", seed=7)
    torch.manual_seed(123)
    second = truncated_svd(delta, 5, method="randomized", seed=7)
    assert torch.equal(first.s, second.s)


def test_frobenius_cosine_matches_dense() -> None:
    first = truncated_svd(torch.randn(25, 15, generator=torch.Generator().manual_seed(8)), 5)
    second = truncated_svd(torch.randn(25, 15, generator=torch.Generator().manual_seed(9)), 5)
    dense = torch.nn.functional.cosine_similarity(first.dense().flatten(), second.dense().flatten(), dim=0)
    assert abs(frobenius_cosine(first, second) - float(dense)) < 1e-5
    assert abs(frobenius_cosine(first, first) - 1.0) < 1e-5


def test_redundancy_filter_drops_near_duplicate() -> None:
    base = _low_rank(30, 20, 3, seed=10)
    other = _low_rank(30, 20, 3, seed=11)
    factors = [truncated_svd(m, 3) for m in (base, 1.01 * base, other)]
    assert redundancy_filter(factors, 0.3) == [0, 2]
    # Every cosine is at most 1 (up to rounding), so a threshold above 1 keeps all tasks.
    assert redundancy_filter(factors, 1.0 + 1e-4) == [0, 1, 2]


def test_low_rank_factors_rank() -> None:
    factors = LowRankFactors(torch.zeros(4, 2), torch.ones(2), torch.zeros(2, 3))
    assert factors.rank == 2
