"""Router: residuals, standardized softmax, threshold and top-k rules on hand-made inputs."""

from __future__ import annotations

import math

import torch

from mergekit_ext.mass.router import RouterSettings, residual_norms, routing_weights, select_tasks


def test_residual_is_distance_to_subspace() -> None:
    features = torch.tensor([[3.0, 4.0, 12.0]])
    bases = [torch.tensor([[1.0, 0.0, 0.0]]), torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]), torch.zeros(0, 3)]
    residuals = residual_norms(features, bases)
    expected = torch.tensor([[math.hypot(4, 12), 3.0, 13.0]])
    torch.testing.assert_close(residuals, expected)


def test_residual_argmin_equals_projection_argmax() -> None:
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(64, 16, generator=generator)
    bases = [torch.linalg.qr(torch.randn(16, 4, generator=generator)).Q.T for _ in range(5)]
    residuals = residual_norms(features, bases)
    projections = torch.stack([torch.linalg.norm(features @ basis.T, dim=1) for basis in bases], dim=1)
    assert torch.equal(residuals.argmin(dim=1), projections.argmax(dim=1))


def test_routing_weights_formula() -> None:
    residuals = torch.tensor([[1.0, 2.0, 4.0]])
    negative = -residuals
    standardized = (negative - negative.mean()) / (negative.std(unbiased=True) + 1e-6)
    expected = torch.softmax(standardized / 0.5, dim=1)
    torch.testing.assert_close(routing_weights(residuals, temperature=0.5), expected)
    assert torch.allclose(routing_weights(residuals).sum(dim=1), torch.ones(1))


def test_threshold_keeps_weights_above_eta() -> None:
    weights = torch.tensor([[0.50, 0.25, 0.15, 0.10]])
    assert select_tasks(weights, RouterSettings(threshold=0.2)) == [(0, 1)]
    assert select_tasks(weights, RouterSettings(threshold=0.12)) == [(0, 1, 2)]


def test_top_k_keeps_largest_weights() -> None:
    weights = torch.tensor([[0.21, 0.30, 0.24, 0.25]])
    assert select_tasks(weights, RouterSettings(threshold=0.2, top_k=3)) == [(1, 2, 3)]
    assert select_tasks(weights, RouterSettings(threshold=0.2, top_k=1)) == [(1,)]


def test_empty_selection_takes_argmax() -> None:
    weights = torch.tensor([[0.19, 0.18, 0.17, 0.16, 0.15, 0.15]])
    assert select_tasks(weights, RouterSettings(threshold=0.2)) == [(0,)]


def test_top1_mode_takes_argmax() -> None:
    weights = torch.tensor([[0.3, 0.4, 0.3], [0.6, 0.3, 0.1]])
    assert select_tasks(weights, RouterSettings(mode="top1")) == [(1,), (0,)]


def test_weight_at_threshold_is_excluded() -> None:
    weights = torch.tensor([[0.2, 0.5, 0.3]])
    assert select_tasks(weights, RouterSettings(threshold=0.2)) == [(1, 2)]
