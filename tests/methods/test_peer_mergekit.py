"""Merge kernels against mergekit 0.1.5 (`mergekit.merge_methods.merge_tensors`) as oracle.

mergekit 0.1.5 has no TSV-M, Iso-C or Iso-CTS, so those are tested against their
formulas only. mergekit draws DARE masks with torch.bernoulli from the global
generator, so seeding it with our per-tensor seed reproduces our masks exactly.
The statistical DARE checks do not rely on that coupling.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip(
    "mergekit",
    reason="mergekit is not installed; install the peer extra: pip install 'mergekit-ext[peer]'",
)
from mergekit.merge_methods import merge_tensors  # noqa: E402
from mergekit.merge_methods import registry as mergekit_registry  # noqa: E402

from mergekit_ext.methods import TensorMergeInput, get_method  # noqa: E402
from mergekit_ext.methods.sparsify import tensor_seed  # noqa: E402

pytestmark = pytest.mark.peer

TOLERANCE = {"atol": 1e-6, "rtol": 1e-6}
TENSOR_NAME = "model.layers.3.mlp.down_proj.weight"


def random_models(
    count: int, shape: tuple[int, ...], seed: int, spread: float = 0.1
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=generator)
    models = [base + spread * torch.randn(shape, generator=generator) for _ in range(count)]
    return base, models


def ours(
    method: str,
    base: torch.Tensor | None,
    models: list[torch.Tensor],
    per_model: dict[str, list[float]],
    shared: dict[str, float],
    seed: int = 0,
) -> torch.Tensor:
    model_parameters = [
        {name: values[index] for name, values in per_model.items()} for index in range(len(models))
    ]
    return get_method(method).merge(
        TensorMergeInput(
            name=TENSOR_NAME,
            base=base,
            models=models,
            model_parameters=model_parameters,
            parameters=shared,
            seed=seed,
        )
    )


def reference(
    method: str,
    base: torch.Tensor | None,
    models: list[torch.Tensor],
    per_model: dict[str, list[float]],
    shared: dict[str, float],
) -> torch.Tensor:
    """Run mergekit with the base first (when given) and booleans as bools."""
    flags = {"normalize", "rescale", "int8_mask"}
    parameters: dict[str, object] = {
        name: bool(value) if name in flags else value for name, value in shared.items()
    }
    parameters.update(per_model)
    tensors = ([base] if base is not None else []) + models
    return merge_tensors(
        tensors,
        method,
        parameters=parameters,
        base_index=0 if base is not None else None,
        name=TENSOR_NAME,
    )


# Parameter names and defaults


@pytest.mark.parametrize(
    "method", ["linear", "task_arithmetic", "ties", "dare_ties", "dare_linear", "slerp"]
)
def test_parameter_defaults_match_mergekit(method: str) -> None:
    theirs = {spec.name: spec for spec in mergekit_registry.get(method).spec.parameters}
    mine = {spec.name: spec for spec in get_method(method).parameters}
    # mergekit's task_arithmetic accepts density and rescale but never sparsifies.
    # Ours rejects them, so a recipe cannot expect a sparsification it won't get.
    ignored = {"density", "rescale"} if method == "task_arithmetic" else set()
    assert set(mine) == set(theirs) - ignored
    for name, spec in mine.items():
        if theirs[name].required:
            # mergekit requires `weight` and `t`. Ours defaults `weight` to 1.0 and requires `t`.
            assert spec.default in (None, 1.0)
            continue
        assert spec.default == float(theirs[name].default), name


# Linear

LINEAR_CASES = [
    ([1.0, 1.0, 1.0], 1.0),
    ([0.2, 0.5, 0.3], 1.0),
    ([0.7, -0.2, 1.5], 1.0),
    ([0.7, -0.2, 1.5], 0.0),
]


@pytest.mark.parametrize(("weights", "normalize"), LINEAR_CASES)
@pytest.mark.parametrize("shape", [(24, 16), (40,)])
def test_linear_matches_mergekit(weights: list[float], normalize: float, shape: tuple[int, ...]) -> None:
    _, models = random_models(3, shape, seed=1)
    per_model = {"weight": weights}
    shared = {"normalize": normalize}
    torch.testing.assert_close(
        ours("linear", None, models, per_model, shared),
        reference("linear", None, models, per_model, shared),
        **TOLERANCE,
    )


# Task arithmetic

TASK_ARITHMETIC_CASES = [
    ([1.0, 1.0], {}),
    ([0.3, 0.9], {"lambda": 0.6}),
    ([0.5, 0.5], {"normalize": 1.0}),
    ([1.2, -0.4], {"normalize": 1.0, "lambda": 1.7}),
    ([1.0, -1.0], {"normalize": 1.0}),
]


@pytest.mark.parametrize(("weights", "shared"), TASK_ARITHMETIC_CASES)
def test_task_arithmetic_matches_mergekit(weights: list[float], shared: dict[str, float]) -> None:
    base, models = random_models(2, (32, 20), seed=2)
    per_model = {"weight": weights}
    torch.testing.assert_close(
        ours("task_arithmetic", base, models, per_model, shared),
        reference("task_arithmetic", base, models, per_model, shared),
        **TOLERANCE,
    )


# TIES

TIES_CASES = [
    ([1.0, 1.0, 1.0], [1.0, 1.0, 1.0], {}),
    ([1.0, 1.0, 1.0], [0.5, 0.5, 0.5], {}),
    ([0.5, 0.3, 0.8], [0.1, 0.5, 0.9], {}),
    ([0.5, 0.3, 0.8], [0.2, 0.2, 0.7], {"normalize": 0.0}),
    ([1.0, 0.6, 0.4], [0.3, 0.6, 0.9], {"lambda": 1.4}),
    ([1.0, -0.5, 0.7], [0.4, 0.4, 0.4], {"normalize": 0.0, "lambda": 0.5}),
    ([0.9, 0.4, 0.2], [0.25, 0.5, 0.75], {"rescale": 1.0}),
    ([0.4, 0.4, 0.4], [0.001, 0.0, 0.6], {}),
    ([0.4, 0.4, 0.4], [0.6, 0.6, 0.6], {"int8_mask": 1.0}),
]


@pytest.mark.parametrize(("weights", "densities", "shared"), TIES_CASES)
@pytest.mark.parametrize("shape", [(48, 32), (64,)])
def test_ties_matches_mergekit(
    weights: list[float], densities: list[float], shared: dict[str, float], shape: tuple[int, ...]
) -> None:
    base, models = random_models(3, shape, seed=3)
    per_model = {"weight": weights, "density": densities}
    torch.testing.assert_close(
        ours("ties", base, models, per_model, shared),
        reference("ties", base, models, per_model, shared),
        **TOLERANCE,
    )


# SLERP


@pytest.mark.parametrize("t", [0.0, 0.1, 0.5, 0.83, 1.0])
@pytest.mark.parametrize("shape", [(30, 20), (50,)])
def test_slerp_matches_mergekit(t: float, shape: tuple[int, ...]) -> None:
    base, models = random_models(1, shape, seed=4, spread=1.0)
    torch.testing.assert_close(
        ours("slerp", base, models, {}, {"t": t}),
        reference("slerp", base, models, {}, {"t": t}),
        **TOLERANCE,
    )


@pytest.mark.parametrize("factor", [1.0001, 3.0, -2.0])
def test_slerp_collinear_matches_mergekit(factor: float) -> None:
    base, _ = random_models(0, (20, 10), seed=5)
    models = [factor * base]
    torch.testing.assert_close(
        ours("slerp", base, models, {}, {"t": 0.3}),
        reference("slerp", base, models, {}, {"t": 0.3}),
        **TOLERANCE,
    )


# DARE

DARE_CASES = [
    ([1.0, 1.0], [0.5, 0.5], {}),
    ([0.6, 0.9], [0.2, 0.8], {}),
    ([0.6, 0.9], [0.3, 0.7], {"normalize": 1.0, "lambda": 1.3}),
    ([1.0, 0.5], [0.4, 1.0], {"rescale": 0.0}),
]


@pytest.mark.parametrize("method", ["dare_ties", "dare_linear"])
@pytest.mark.parametrize(("weights", "densities", "shared"), DARE_CASES)
def test_dare_matches_mergekit_with_same_draws(
    method: str, weights: list[float], densities: list[float], shared: dict[str, float]
) -> None:
    base, models = random_models(2, (40, 30), seed=6)
    per_model = {"weight": weights, "density": densities}
    mine = ours(method, base, models, per_model, shared, seed=9)

    # mergekit draws each mask with torch.bernoulli from the global generator, in
    # model order, skipping models with density 1, as ours does from its own.
    torch.manual_seed(tensor_seed(9, TENSOR_NAME))
    theirs = reference(method, base, models, per_model, shared)
    torch.testing.assert_close(mine, theirs, **TOLERANCE)


@pytest.mark.parametrize(("method", "equivalent"), [("dare_ties", "ties"), ("dare_linear", "task_arithmetic")])
def test_dare_density_one_matches_mergekit(method: str, equivalent: str) -> None:
    base, models = random_models(3, (24, 24), seed=7)
    per_model = {"weight": [0.4, 0.9, 0.6], "density": [1.0, 1.0, 1.0]}
    theirs = reference(method, base, models, per_model, {})
    torch.testing.assert_close(ours(method, base, models, per_model, {}), theirs, **TOLERANCE)

    # With nothing dropped, DARE reduces to its non-random counterpart
    # (ties normalizes by default, dare_ties does not).
    shared = {"normalize": 0.0} if equivalent == "ties" else {}
    equivalent_parameters = per_model if equivalent == "ties" else {"weight": per_model["weight"]}
    torch.testing.assert_close(
        theirs, reference(equivalent, base, models, equivalent_parameters, shared), **TOLERANCE
    )


@pytest.mark.parametrize("density", [0.2, 0.5, 0.9])
def test_dare_statistics_match_mergekit(density: float) -> None:
    base, models = random_models(1, (300, 400), seed=8)
    per_model = {"weight": [1.0], "density": [density]}
    mine = ours("dare_linear", base, models, per_model, {}, seed=21) - base
    torch.manual_seed(1234)
    theirs = reference("dare_linear", base, models, per_model, {}) - base

    # 120 000 Bernoulli draws: the standard error of the kept fraction is below 0.0015.
    for task_vector in (mine, theirs):
        assert abs((task_vector != 0).float().mean().item() - density) < 0.008
    original_l1 = (models[0] - base).abs().sum()
    torch.testing.assert_close(mine.abs().sum(), original_l1, rtol=1e-4, atol=0.0)
    torch.testing.assert_close(theirs.abs().sum(), original_l1, rtol=1e-4, atol=0.0)
