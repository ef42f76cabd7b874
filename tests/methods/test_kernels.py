"""Merge kernels against their formulas on small hand-made tensors."""

from __future__ import annotations

import math

import pytest
import torch

from mergekit_ext.errors import IncompatibleModelsError, RecipeError
from mergekit_ext.methods import METHODS, TensorMergeInput, get_method
from mergekit_ext.methods.consensus import agreement_mask, elected_sign
from mergekit_ext.methods.iso import iso_cts_ranks
import mergekit_ext.methods.sparsify as sparsify
from mergekit_ext.methods.sparsify import (
    SAMPLED_SELECTION_MIN,
    bernoulli_mask,
    kth_largest,
    l1_rescale_factor,
    magnitude_mask,
    tensor_generator,
    tensor_seed,
)
from mergekit_ext.methods.svd import polar_factor, truncated_svd
from mergekit_ext.methods.tsv import tsv_merge_deltas, tsv_rank


def merge(
    method: str,
    base: torch.Tensor | None,
    models: list[torch.Tensor],
    model_parameters: list[dict[str, float]] | None = None,
    seed: int = 0,
    name: str = "layers.0.weight",
    **parameters: float,
) -> torch.Tensor:
    return get_method(method).merge(
        TensorMergeInput(
            name=name,
            base=base,
            models=models,
            model_parameters=model_parameters or [],
            parameters=parameters,
            seed=seed,
        )
    )


def tensor(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def orthonormal_columns(rows: int, columns: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(rows, columns, generator=generator))
    return q


# Registry and parameters


def test_registry_lists_all_methods() -> None:
    assert list(METHODS) == [
        "linear",
        "task_arithmetic",
        "ties",
        "dare_ties",
        "dare_linear",
        "slerp",
        "tsv",
        "iso_c",
        "iso_cts",
    ]
    for name, method in METHODS.items():
        assert method.name == name
        assert method.description


@pytest.mark.parametrize(
    ("spelling", "expected"),
    [
        ("task_arithmetic", "task_arithmetic"),
        ("task-arithmetic", "task_arithmetic"),
        ("dare-ties", "dare_ties"),
        ("Iso-CTS", "iso_cts"),
        ("tsv-m", "tsv"),
    ],
)
def test_get_method_spellings(spelling: str, expected: str) -> None:
    assert get_method(spelling).name == expected


def test_get_method_unknown_lists_valid() -> None:
    with pytest.raises(RecipeError, match="unknown merge method 'frankenmerge'") as error:
        get_method("frankenmerge")
    for name in METHODS:
        assert name in str(error.value)


@pytest.mark.parametrize(
    ("method", "expected"),
    [
        ("linear", {"weight": (1.0, True), "normalize": (1.0, False)}),
        (
            "task_arithmetic",
            {
                "weight": (1.0, True),
                "lambda": (1.0, False),
                "normalize": (0.0, False),
                "int8_mask": (0.0, False),
            },
        ),
        (
            "ties",
            {
                "weight": (1.0, True),
                "density": (1.0, True),
                "lambda": (1.0, False),
                "normalize": (1.0, False),
                "rescale": (0.0, False),
                "int8_mask": (0.0, False),
            },
        ),
        (
            "dare_ties",
            {
                "weight": (1.0, True),
                "density": (1.0, True),
                "lambda": (1.0, False),
                "normalize": (0.0, False),
                "rescale": (1.0, False),
                "int8_mask": (0.0, False),
            },
        ),
        (
            "dare_linear",
            {
                "weight": (1.0, True),
                "density": (1.0, True),
                "lambda": (1.0, False),
                "normalize": (0.0, False),
                "rescale": (1.0, False),
                "int8_mask": (0.0, False),
            },
        ),
        ("slerp", {"t": (None, False)}),
        ("tsv", {"alpha": (1.0, False)}),
        ("iso_c", {"alpha": (1.0, False)}),
        ("iso_cts", {"alpha": (1.0, False), "common_space_fraction": (0.8, False)}),
    ],
)
def test_parameter_specs(method: str, expected: dict[str, tuple[float | None, bool]]) -> None:
    specs = {spec.name: (spec.default, spec.per_model) for spec in get_method(method).parameters}
    assert specs == expected


def test_requires_base_flags() -> None:
    assert METHODS["linear"].requires_base is False
    for name in METHODS:
        if name != "linear":
            assert METHODS[name].requires_base is True


def test_unknown_parameter_rejected() -> None:
    with pytest.raises(RecipeError, match="no parameter 'densty'.*Valid parameters"):
        merge("ties", tensor(0, 0), [tensor(1, 1)], densty=0.5)


def test_unknown_model_parameter_rejected() -> None:
    with pytest.raises(RecipeError, match="no parameter 'density'.*model 0"):
        merge("task_arithmetic", tensor(0, 0), [tensor(1, 1)], [{"density": 0.5}])


def test_shared_parameter_per_model_rejected() -> None:
    with pytest.raises(RecipeError, match="'lambda'.*applies to the whole merge"):
        merge("ties", tensor(0, 0), [tensor(1, 1)], [{"lambda": 0.5}])


def test_missing_slerp_t_rejected() -> None:
    with pytest.raises(RecipeError, match="requires parameter 't'"):
        merge("slerp", tensor(0, 0), [tensor(1, 1)])


def test_flag_must_be_zero_or_one() -> None:
    with pytest.raises(RecipeError, match="'normalize'.*0 \\(off\\) or 1 \\(on\\)"):
        merge("ties", tensor(0, 0), [tensor(1, 1)], normalize=0.5)


@pytest.mark.parametrize("density", [-0.1, 1.5, math.nan])
def test_density_out_of_range_rejected(density: float) -> None:
    with pytest.raises(RecipeError, match="'density'"):
        merge("ties", tensor(0, 0), [tensor(1, 1)], [{"density": density}])


def test_global_value_fills_per_model_parameter() -> None:
    base = tensor(0, 0)
    models = [tensor(2, 4), tensor(4, 8)]
    result = merge("linear", base, models, [{"weight": 3.0}, {}], weight=1.0)
    torch.testing.assert_close(result, tensor(2.5, 5.0))


@pytest.mark.parametrize("method", [name for name in METHODS if name != "linear"])
def test_missing_base_rejected(method: str) -> None:
    with pytest.raises(RecipeError, match="needs a base model"):
        merge(method, None, [tensor(1, 2)], t=0.5)


@pytest.mark.parametrize("method", list(METHODS))
def test_shape_mismatch_names_tensor_and_shapes(method: str) -> None:
    base = torch.zeros(3, 4)
    models = [torch.ones(3, 4), torch.ones(5, 4)]
    if method == "slerp":
        models = [torch.ones(5, 4)]
    with pytest.raises(IncompatibleModelsError) as error:
        merge(method, base, models, name="model.embed_tokens.weight", t=0.5)
    message = str(error.value)
    assert "model.embed_tokens.weight" in message
    assert "(3, 4)" in message
    assert "(5, 4)" in message


# Linear


def test_linear_weighted_average() -> None:
    result = merge("linear", None, [tensor(1, 2), tensor(3, 6)], [{"weight": 1.0}, {"weight": 3.0}])
    torch.testing.assert_close(result, tensor(2.5, 5.0))


def test_linear_without_normalize() -> None:
    result = merge(
        "linear", None, [tensor(1, 2), tensor(3, 6)], [{"weight": 1.0}, {"weight": 3.0}], normalize=0.0
    )
    torch.testing.assert_close(result, tensor(10.0, 20.0))


def test_linear_ignores_unlisted_base() -> None:
    result = merge("linear", tensor(100, 100), [tensor(1, 2), tensor(3, 6)])
    torch.testing.assert_close(result, tensor(2.0, 4.0))


def test_linear_zero_weight_sum_rejected() -> None:
    with pytest.raises(RecipeError, match="sum to 0"):
        merge("linear", None, [tensor(1, 2), tensor(3, 6)], [{"weight": 1.0}, {"weight": -1.0}])


# Task arithmetic


def test_task_arithmetic_formula() -> None:
    base = tensor(1, 1, 1)
    models = [tensor(2, 0, 1), tensor(1, 3, 1)]
    weights = [{"weight": 1.0}, {"weight": 0.5}]
    # Task vectors [1, -1, 0] and [0, 2, 0]; weighted sum [1, 0, 0].
    torch.testing.assert_close(merge("task_arithmetic", base, models, weights), tensor(2, 1, 1))
    torch.testing.assert_close(
        merge("task_arithmetic", base, models, weights, **{"lambda": 2.0}), tensor(3, 1, 1)
    )
    torch.testing.assert_close(
        merge("task_arithmetic", base, models, weights, normalize=1.0), tensor(1 + 1 / 1.5, 1, 1)
    )


def test_task_arithmetic_zero_weight_sum_divides_by_one() -> None:
    base = tensor(0, 0)
    models = [tensor(1, 2), tensor(3, 2)]
    weights = [{"weight": 1.0}, {"weight": -1.0}]
    result = merge("task_arithmetic", base, models, weights, normalize=1.0)
    torch.testing.assert_close(result, tensor(-2, 0))


def test_task_arithmetic_without_models_returns_base() -> None:
    base = tensor(1, 2)
    torch.testing.assert_close(merge("task_arithmetic", base, []), base)


# Sparsification and sign election


def test_magnitude_mask_keeps_largest() -> None:
    delta = tensor(0.1, -3.0, 2.0, 0.5)
    assert magnitude_mask(delta, 0.5).tolist() == [False, True, True, False]
    assert magnitude_mask(delta, 0.75).tolist() == [False, True, True, True]


def test_magnitude_mask_keeps_at_least_one() -> None:
    # int(0.1 * 4) = 0, raised to 1.
    assert magnitude_mask(tensor(0.1, -3.0, 2.0, 0.5), 0.1).tolist() == [False, True, False, False]


def test_magnitude_mask_edges() -> None:
    delta = tensor(1.0, 2.0)
    assert magnitude_mask(delta, 1.0) is None
    assert magnitude_mask(delta, 0.0).tolist() == [False, False]


def test_magnitude_mask_ties_keep_lower_index() -> None:
    assert magnitude_mask(tensor(1.0, -2.0, 2.0, 2.0), 0.5).tolist() == [False, True, True, False]


def test_magnitude_mask_matches_stable_sort() -> None:
    # Integer values give many ties; the mask must equal the first k entries of a
    # stable descending sort of |delta|.
    for trial in range(50):
        generator = torch.Generator().manual_seed(trial)
        delta = torch.randint(-4, 5, (97,), generator=generator).float()
        density = (trial + 1) / 51
        keep_count = max(1, int(density * delta.numel()))
        order = torch.argsort(delta.abs(), descending=True, stable=True)
        expected = torch.zeros(delta.numel(), dtype=torch.bool)
        expected[order[:keep_count]] = True
        assert torch.equal(magnitude_mask(delta, density), expected), trial


def stable_sort_mask(delta: torch.Tensor, density: float) -> torch.Tensor:
    keep_count = max(1, int(density * delta.numel()))
    order = torch.argsort(delta.abs(), descending=True, stable=True)
    expected = torch.zeros(delta.numel(), dtype=torch.bool)
    expected[order[:keep_count]] = True
    return expected


@pytest.mark.parametrize("density", [1e-6, 0.2, 0.5, 0.97])
def test_magnitude_mask_large_tensor_with_ties(density: float) -> None:
    # Above SAMPLED_SELECTION_MIN entries the threshold comes from a sampled bracket.
    # Integer values make ties at the cut almost certain.
    generator = torch.Generator().manual_seed(21)
    delta = torch.randint(-60, 61, (SAMPLED_SELECTION_MIN + 4097,), generator=generator).float()
    assert torch.equal(magnitude_mask(delta, density), stable_sort_mask(delta, density))


@pytest.mark.parametrize("density", [0.3, 0.5, 0.8])
def test_magnitude_mask_mostly_zero_task_vector(density: float, monkeypatch: pytest.MonkeyPatch) -> None:
    # 60 % zeros: at density 0.5 and 0.8 the cut falls on zero, where both sample
    # quantiles are 0 and the entries are counted instead of extracted. That must
    # not need the full-selection fallback.
    generator = torch.Generator().manual_seed(23)
    delta = torch.randn(SAMPLED_SELECTION_MIN + 999, generator=generator)
    delta[torch.rand(delta.numel(), generator=generator) < 0.6] = 0.0
    fallbacks = []
    full = sparsify._full_selection
    monkeypatch.setattr(sparsify, "_full_selection", lambda *args: fallbacks.append(args) or full(*args))
    assert torch.equal(magnitude_mask(delta, density), stable_sort_mask(delta, density))
    assert not fallbacks


def test_kth_largest_counts_and_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    generator = torch.Generator().manual_seed(22)
    flat = torch.randn(SAMPLED_SELECTION_MIN * 2, generator=generator).abs()
    flat[:1000] = 0.5  # a tied block
    fallbacks = []
    counted = sparsify._counted

    def record(values: torch.Tensor, value: torch.Tensor) -> sparsify.Selection:
        fallbacks.append(float(value))
        return counted(values, value)

    monkeypatch.setattr(sparsify, "_counted", record)
    for sigmas in (sparsify.SELECTION_BRACKET_SIGMAS, 0.0):
        # A zero-width bracket misses often, which exercises the full-selection fallback.
        monkeypatch.setattr(sparsify, "SELECTION_BRACKET_SIGMAS", sigmas)
        for count in (1, 7, flat.numel() // 3, flat.numel() - 5, flat.numel()):
            selection = kth_largest(flat, count)
            expected = torch.kthvalue(flat, flat.numel() - count + 1).values
            assert float(selection.value) == float(expected), (sigmas, count)
            assert selection.above == int((flat > expected).sum()), (sigmas, count)
            assert selection.at_or_above == int((flat >= expected).sum()), (sigmas, count)
    assert fallbacks, "no count took the fallback path"


def test_l1_rescale_factor() -> None:
    delta = tensor(1.0, -2.0, 3.0, 4.0)
    mask = torch.tensor([True, False, True, False])
    factor = l1_rescale_factor(delta, mask)
    assert factor is not None
    assert factor.item() == pytest.approx(10.0 / 4.0)


def test_l1_rescale_skipped_below_epsilon() -> None:
    delta = tensor(1e-8, 2.0)
    assert l1_rescale_factor(delta, torch.tensor([True, False])) is None
    assert l1_rescale_factor(tensor(1e-8, 1e-8), torch.tensor([True, True])) is None


def test_elected_sign_counts_zero_as_positive() -> None:
    assert elected_sign(tensor(0.0, -1.0, 2.0, -0.0)).tolist() == [1.0, -1.0, 1.0, 1.0]


def test_agreement_mask_drops_zero_entries() -> None:
    sign = tensor(1.0, 1.0, -1.0)
    assert agreement_mask(tensor(0.0, 2.0, 3.0), sign).tolist() == [False, True, False]


# TIES

TIES_BASE = tensor(1.0, 1.0, 1.0, 1.0)
# Task vectors [1, -2, 3, 0.5] and [-2, 1.5, 1, 0.1]; at density 0.5 they trim to
# [0, -2, 3, 0] and [-2, 1.5, 0, 0].
TIES_MODELS = [TIES_BASE + tensor(1.0, -2.0, 3.0, 0.5), TIES_BASE + tensor(-2.0, 1.5, 1.0, 0.1)]
TIES_PARAMETERS = [{"weight": 1.0, "density": 0.5}, {"weight": 2.0, "density": 0.5}]


def test_ties_formula() -> None:
    # Weighted: [0, -2, 3, 0] and [-4, 3, 0, 0]; sum [-4, 1, 3, 0] elects [-, +, +, +].
    # Agreeing entries sum to [-4, 3, 3, 0] with weight sums [2, 2, 1, 0 -> 1].
    result = merge("ties", TIES_BASE, TIES_MODELS, TIES_PARAMETERS)
    torch.testing.assert_close(result, TIES_BASE + tensor(-2.0, 1.5, 3.0, 0.0))


def test_ties_unchanged_model_adds_nothing() -> None:
    # A third model equal to the base has a zero task vector: zero entries never agree
    # with the elected sign, so neither the sum nor the divisor changes.
    models = [*TIES_MODELS, TIES_BASE.clone()]
    parameters = [*TIES_PARAMETERS, {"weight": 5.0, "density": 0.5}]
    result = merge("ties", TIES_BASE, models, parameters)
    torch.testing.assert_close(result, TIES_BASE + tensor(-2.0, 1.5, 3.0, 0.0))


def test_ties_without_normalize() -> None:
    result = merge("ties", TIES_BASE, TIES_MODELS, TIES_PARAMETERS, normalize=0.0)
    torch.testing.assert_close(result, TIES_BASE + tensor(-4.0, 3.0, 3.0, 0.0))


def test_ties_lambda_scales_after_normalize() -> None:
    result = merge("ties", TIES_BASE, TIES_MODELS, TIES_PARAMETERS, **{"lambda": 0.5})
    torch.testing.assert_close(result, TIES_BASE + tensor(-1.0, 0.75, 1.5, 0.0))


def test_ties_rescale_matches_l1_norm() -> None:
    base = tensor(0, 0, 0, 0)
    model = tensor(1.0, -2.0, 3.0, 4.0)
    result = merge("ties", base, [model], [{"density": 0.5}], rescale=1.0, normalize=0.0)
    # Keeps [0, 0, 3, 4], scaled by 10 / 7.
    torch.testing.assert_close(result, tensor(0.0, 0.0, 30 / 7, 40 / 7))


def test_ties_zero_divisor_replaced_by_one() -> None:
    # Both weighted task vectors are positive (2 and -1 * -3), so both agree, but
    # their weights sum to 0; the divisor becomes 1.
    base = tensor(0.0)
    models = [tensor(2.0), tensor(-3.0)]
    result = merge("ties", base, models, [{"weight": 1.0}, {"weight": -1.0}])
    torch.testing.assert_close(result, tensor(5.0))


def test_ties_full_density_single_model_is_identity() -> None:
    base = tensor(1.0, 2.0, 3.0)
    model = tensor(0.0, 5.0, 3.0)
    torch.testing.assert_close(merge("ties", base, [model], [{"weight": 0.3}]), model)


def dense_reference_ties(
    base: torch.Tensor, models: list[torch.Tensor], weights: list[float], density: float
) -> torch.Tensor:
    """TIES written out on whole float32 tensors: stable-sort masks, then sign election.

    Density 0 keeps nothing (magnitude_mask's edge case), else at least one entry.
    """
    base = base.float()
    weighted = []
    for model, weight in zip(models, weights):
        delta = model.float() - base
        mask = stable_sort_mask(delta, density) if density > 0 else torch.zeros_like(delta, dtype=torch.bool)
        weighted.append(delta * mask * weight)
    total = torch.zeros_like(base)
    for term in weighted:
        total += term
    sign = torch.where(total >= 0, 1.0, -1.0)
    mixed = torch.zeros_like(base)
    divisor = torch.zeros_like(base)
    for term, weight in zip(weighted, weights):
        agrees = torch.sign(term) == sign
        mixed += term * agrees
        divisor += weight * agrees
    divisor[divisor == 0] = 1.0
    return base + mixed / divisor


@pytest.mark.parametrize("density", [0.0, 0.3, 0.5, 0.9])
def test_ties_block_wise_matches_dense_reference_on_bf16(density: float) -> None:
    # Three blocks and a partial one, above the sampled-selection size. bf16 inputs
    # with task vectors on a coarse grid tie at almost every cut, and a negative
    # weight flips one model's sign.
    generator = torch.Generator().manual_seed(5)
    size = 2 * sparsify.BLOCK_ELEMENTS + 1234
    assert size > SAMPLED_SELECTION_MIN
    base = torch.randn(size, generator=generator).to(torch.bfloat16)
    models = [(base.float() + torch.randint(-6, 7, (size,), generator=generator) / 64).to(torch.bfloat16)
              for _ in range(3)]
    weights = [0.5, 1.25, -0.75]
    parameters = [{"weight": weight, "density": density} for weight in weights]
    expected = dense_reference_ties(base, models, weights, density)
    from_bf16 = merge("ties", base, models, parameters)
    from_float32 = merge("ties", base.float(), [model.float() for model in models], parameters)
    assert from_bf16.dtype == torch.float32
    assert torch.equal(from_bf16, expected)
    assert torch.equal(from_float32, expected)


def test_magnitude_cut_applies_to_blocks_in_any_order() -> None:
    generator = torch.Generator().manual_seed(6)
    size = SAMPLED_SELECTION_MIN + 5000
    base = torch.randn(size, generator=generator).to(torch.bfloat16)
    model = (base.float() + torch.randint(-3, 4, (size,), generator=generator) / 32).to(torch.bfloat16)
    delta = model.float() - base.float()
    for density in (0.01, 0.4, 0.75):
        cut = sparsify.magnitude_cut(sparsify.TaskVectorMagnitudes(model, base), density)
        assert cut is not None
        expected = stable_sort_mask(delta, density)
        parts = list(reversed(sparsify.block_slices(size, 70001)))
        masks = {part.start: cut.mask(delta.abs()[part], part.start) for part in parts}
        selected = {part.start: cut.select(delta[part], part.start) for part in parts}
        assert torch.equal(torch.cat([masks[start] for start in sorted(masks)]), expected), density
        assert torch.equal(torch.cat([selected[start] for start in sorted(selected)]), delta * expected), density


# DARE


def test_tensor_seed_is_stable() -> None:
    # First 8 bytes, little-endian, of SHA-256("7:layers.0.weight").
    import hashlib

    digest = hashlib.sha256(b"7:layers.0.weight").digest()
    assert tensor_seed(7, "layers.0.weight") == int.from_bytes(digest[:8], "little")
    assert tensor_seed(7, "layers.0.weight") != tensor_seed(7, "layers.1.weight")


def test_bernoulli_mask_density_one_keeps_all() -> None:
    assert bernoulli_mask(torch.Size([3]), 1.0, tensor_generator(0, "x"), torch.device("cpu")) is None


DARE_SHAPE = (400, 500)


def dare_inputs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(DARE_SHAPE, generator=generator)
    model = base + torch.randn(DARE_SHAPE, generator=generator)
    return base, model


@pytest.mark.parametrize("density", [0.1, 0.3, 0.7])
def test_dare_kept_fraction_and_l1_norm(density: float) -> None:
    base, model = dare_inputs()
    result = merge("dare_linear", base, [model], [{"density": density}], seed=3)
    kept = result - base
    kept_fraction = (kept != 0).float().mean().item()
    # 200 000 Bernoulli draws: the standard error of the fraction is below 0.0011.
    assert abs(kept_fraction - density) < 0.006
    delta_l1 = (model - base).abs().sum()
    torch.testing.assert_close(kept.abs().sum(), delta_l1, rtol=1e-4, atol=0.0)


def test_dare_rescale_off_keeps_values() -> None:
    base, model = dare_inputs()
    result = merge("dare_linear", base, [model], [{"density": 0.5}], rescale=0.0)
    kept = result - base
    nonzero = kept != 0
    torch.testing.assert_close(kept[nonzero], (model - base)[nonzero], rtol=1e-5, atol=1e-5)


def test_dare_formula_single_model() -> None:
    base, model = dare_inputs()
    result = merge("dare_linear", base, [model], [{"density": 0.4, "weight": 0.5}], seed=11, **{"lambda": 2.0})
    generator = tensor_generator(11, "layers.0.weight")
    mask = torch.bernoulli(torch.full(DARE_SHAPE, 0.4), generator=generator)
    delta = model - base
    expected = base + 2.0 * 0.5 * delta * mask * (delta.abs().sum() / (delta * mask).abs().sum())
    torch.testing.assert_close(result, expected, rtol=1e-5, atol=1e-5)


def test_dare_ties_formula_two_models() -> None:
    base, first = dare_inputs(1)
    _, second = dare_inputs(2)
    parameters = [{"density": 0.3, "weight": 1.0}, {"density": 0.6, "weight": 0.5}]
    result = merge("dare_ties", base, [first, second], parameters, seed=5, normalize=1.0)

    generator = tensor_generator(5, "layers.0.weight")
    weighted = []
    for model, values in zip([first, second], parameters):
        mask = torch.bernoulli(torch.full(DARE_SHAPE, values["density"]), generator=generator)
        delta = model - base
        sparse = delta * mask * (delta.abs().sum() / (delta * mask).abs().sum())
        weighted.append(sparse * values["weight"])
    stacked = torch.stack(weighted)
    sign = torch.where(stacked.sum(0) >= 0, 1.0, -1.0)
    agrees = torch.sign(stacked) == sign
    weights = torch.tensor([1.0, 0.5]).reshape(2, 1, 1)
    divisor = (weights * agrees).sum(0)
    divisor[divisor == 0] = 1.0
    expected = base + (stacked * agrees).sum(0) / divisor
    torch.testing.assert_close(result, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["dare_ties", "dare_linear"])
def test_dare_density_one_is_identity(method: str) -> None:
    base, model = dare_inputs()
    result = merge(method, base, [model], [{"density": 1.0}])
    torch.testing.assert_close(result, model)


def test_dare_same_seed_and_name_repeat() -> None:
    base, model = dare_inputs()
    first = merge("dare_linear", base, [model], [{"density": 0.5}], seed=1, name="a.weight")
    torch.manual_seed(123)
    second = merge("dare_linear", base, [model], [{"density": 0.5}], seed=1, name="a.weight")
    assert torch.equal(first, second)


def test_dare_name_and_seed_change_mask() -> None:
    base, model = dare_inputs()
    reference = merge("dare_linear", base, [model], [{"density": 0.5}], seed=1, name="a.weight")
    other_name = merge("dare_linear", base, [model], [{"density": 0.5}], seed=1, name="b.weight")
    other_seed = merge("dare_linear", base, [model], [{"density": 0.5}], seed=2, name="a.weight")
    assert not torch.equal(reference != base, other_name != base)
    assert not torch.equal(reference != base, other_seed != base)


def test_dare_leaves_global_generator_alone() -> None:
    base, model = dare_inputs()
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    merge("dare_ties", base, [model], [{"density": 0.5}])
    assert torch.equal(torch.rand(3), expected)


# SLERP


def test_slerp_t_zero_returns_base() -> None:
    base = tensor(0.3, -1.0, 2.0)
    assert torch.equal(merge("slerp", base, [tensor(1.0, 0.0, 0.5)], t=0.0), base)


def test_slerp_t_one_returns_model() -> None:
    model = tensor(1.0, 0.0, 0.5)
    torch.testing.assert_close(merge("slerp", tensor(0.3, -1.0, 2.0), [model], t=1.0), model)


def test_slerp_orthogonal_vectors() -> None:
    # theta = pi / 2: coefficients sin((1 - t) theta) and sin(t theta) on the raw tensors.
    result = merge("slerp", tensor(1.0, 0.0), [tensor(0.0, 2.0)], t=0.5)
    half = math.sin(math.pi / 4)
    torch.testing.assert_close(result, tensor(half, 2 * half))
    result = merge("slerp", tensor(1.0, 0.0), [tensor(0.0, 2.0)], t=1 / 3)
    torch.testing.assert_close(result, tensor(math.sin(math.pi / 3), 2 * math.sin(math.pi / 6)))


def test_slerp_collinear_uses_lerp() -> None:
    base = tensor(1.0, 2.0, 3.0)
    # cos = 1 > 0.9995, so the result is (1 - t) base + t model.
    torch.testing.assert_close(merge("slerp", base, [2.0 * base], t=0.25), 1.25 * base)
    # Antipodal, |cos| = 1: lerp gives the midpoint 0.
    torch.testing.assert_close(merge("slerp", base, [-base], t=0.5), tensor(0.0, 0.0, 0.0))


def test_slerp_needs_exactly_one_model() -> None:
    with pytest.raises(RecipeError, match="exactly one model"):
        merge("slerp", tensor(1.0), [tensor(1.0), tensor(2.0)], t=0.5)


# SVD helpers and TSV-M


def test_truncated_svd_rank() -> None:
    matrix = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
    u, s, vh = truncated_svd(matrix, 2)
    assert u.shape == (6, 2)
    assert s.shape == (2,)
    assert vh.shape == (2, 4)
    full = torch.linalg.svdvals(matrix)
    torch.testing.assert_close(s, full[:2])


def test_polar_factor_orthonormal_columns() -> None:
    matrix = torch.randn(10, 4, generator=torch.Generator().manual_seed(1))
    factor = polar_factor(matrix)
    torch.testing.assert_close(factor.T @ factor, torch.eye(4), atol=1e-5, rtol=0)


def test_polar_factor_recovers_orthogonal_part() -> None:
    # A = Q H with H symmetric positive definite has polar factor Q.
    q = orthonormal_columns(8, 3, seed=2)
    h = torch.tensor([[2.0, 0.5, 0.0], [0.5, 1.0, 0.2], [0.0, 0.2, 3.0]])
    torch.testing.assert_close(polar_factor(q @ h), q, atol=1e-5, rtol=0)


def svd_polar(matrix: torch.Tensor) -> torch.Tensor:
    p, _, qh = torch.linalg.svd(matrix.double(), full_matrices=False)
    return (p @ qh).float()


@pytest.mark.parametrize("condition", [1.0, 30.0, 1e3])
def test_polar_factor_equals_svd_route(condition: float) -> None:
    # Singular values from 1 down to 1/condition; every case takes the Gram route.
    left = orthonormal_columns(40, 12, seed=11)
    right = orthonormal_columns(12, 12, seed=12)
    sigma = torch.logspace(0, -math.log10(condition), 12)
    matrix = (left * sigma) @ right.T
    torch.testing.assert_close(polar_factor(matrix), svd_polar(matrix), atol=2e-5, rtol=0)


def test_polar_factor_of_rank_deficient_matrix_uses_svd() -> None:
    # A repeated column makes AᵀA singular: no inverse square root exists, and the
    # result must still be finite with orthonormal columns (the SVD route).
    base = torch.randn(9, 3, generator=torch.Generator().manual_seed(13))
    matrix = torch.cat([base, base[:, :1]], dim=1)
    factor = polar_factor(matrix)
    assert torch.isfinite(factor).all()
    torch.testing.assert_close(factor.T @ factor, torch.eye(4), atol=1e-5, rtol=0)
    # A = U H with H = UᵀA symmetric positive semidefinite.
    h = factor.T @ matrix
    torch.testing.assert_close(h, h.T, atol=1e-5, rtol=0)
    assert float(torch.linalg.eigvalsh(h).min()) > -1e-5


def test_tsv_rank_formula() -> None:
    assert tsv_rank(torch.Size([768, 3072]), 8) == 96
    assert tsv_rank(torch.Size([10, 7]), 3) == 2


def test_tsv_single_task_is_rank_k_truncation() -> None:
    delta = torch.randn(9, 6, generator=torch.Generator().manual_seed(3))
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    merged = tsv_merge_deltas([delta], rank=2)
    torch.testing.assert_close(merged, u[:, :2] @ torch.diag(s[:2]) @ vh[:2], atol=1e-5, rtol=1e-5)


def test_tsv_one_task_returns_model() -> None:
    generator = torch.Generator().manual_seed(4)
    base = torch.randn(5, 7, generator=generator)
    model = base + torch.randn(5, 7, generator=generator)
    # T = 1 keeps k = min(m, n) components, the whole task vector.
    torch.testing.assert_close(merge("tsv", base, [model]), model, atol=1e-5, rtol=1e-5)


def test_tsv_leaves_out_unchanged_task() -> None:
    # Task 2 leaves the tensor unchanged. Its zero task vector has arbitrary singular
    # bases, which must not rotate task 1's: the merge is task 1's rank-k truncation
    # with k = floor(min(m, n) / 2) (the rank counts both tasks).
    generator = torch.Generator().manual_seed(8)
    base = torch.randn(12, 10, generator=generator)
    delta = torch.randn(12, 10, generator=generator)
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    result = merge("tsv", base, [base + delta, base.clone()])
    torch.testing.assert_close(result, base + u[:, :5] @ torch.diag(s[:5]) @ vh[:5], atol=1e-5, rtol=1e-5)
    # Both unchanged: the base comes back.
    torch.testing.assert_close(merge("tsv", base, [base.clone(), base.clone()]), base)


def test_tsv_orthogonal_tasks_add_truncations() -> None:
    # A 10 x 8 matrix with T = 2 keeps k = 4 components per task. Each task has four
    # strong directions, orthogonal to the other task's, plus one weak direction
    # that the truncation drops. The polar factors then change nothing, so TSV-M is
    # the sum of the two rank-4 truncations.
    left = orthonormal_columns(10, 10, seed=5)
    right = orthonormal_columns(8, 8, seed=6)
    strong_first = left[:, 0:4] @ torch.diag(tensor(5.0, 4.0, 3.0, 2.0)) @ right[:, 0:4].T
    strong_second = left[:, 4:8] @ torch.diag(tensor(6.0, 2.5, 1.5, 1.2)) @ right[:, 4:8].T
    first = strong_first + 0.1 * left[:, 8:9] @ right[:, 4:5].T
    second = strong_second + 0.2 * left[:, 9:10] @ right[:, 0:1].T

    result = merge("tsv", torch.zeros(10, 8), [first, second])
    torch.testing.assert_close(result, strong_first + strong_second, atol=1e-5, rtol=1e-5)


def test_tsv_two_tasks_formula() -> None:
    generator = torch.Generator().manual_seed(7)
    deltas = [torch.randn(7, 5, generator=generator) for _ in range(2)]
    base = torch.randn(7, 5, generator=generator)
    result = merge("tsv", base, [base + delta for delta in deltas], alpha=0.7)

    k = 2
    us, ss, vs = [], [], []
    for delta in deltas:
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        us.append(u[:, :k])
        ss.append(s[:k])
        vs.append(vh[:k].T)
    u_hat = torch.cat(us, dim=1)
    v_hat = torch.cat(vs, dim=1)
    p, _, qh = torch.linalg.svd(u_hat, full_matrices=False)
    u_perp = p @ qh
    p, _, qh = torch.linalg.svd(v_hat, full_matrices=False)
    v_perp = p @ qh
    expected = base + 0.7 * u_perp @ torch.diag(torch.cat(ss)) @ v_perp.T
    torch.testing.assert_close(result, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", ["tsv", "iso_c", "iso_cts"])
def test_subspace_methods_non_matrix_mean(method: str) -> None:
    base = tensor(1.0, 1.0, 1.0)
    models = [tensor(2.0, 1.0, 0.0), tensor(1.0, 3.0, 0.0)]
    # Mean task vector [0.5, 1, -1], times alpha.
    result = merge(method, base, models, alpha=2.0)
    torch.testing.assert_close(result, tensor(2.0, 3.0, -1.0))


def test_tsv_more_tasks_than_rank_uses_mean() -> None:
    base = torch.zeros(2, 5)
    models = [torch.full((2, 5), float(value)) for value in (1, 2, 6)]
    result = merge("tsv", base, models)
    torch.testing.assert_close(result, torch.full((2, 5), 3.0))


# Iso-C and Iso-CTS


def test_iso_c_flattens_spectrum() -> None:
    generator = torch.Generator().manual_seed(8)
    base = torch.randn(9, 6, generator=generator)
    deltas = [torch.randn(9, 6, generator=generator) for _ in range(3)]
    result = merge("iso_c", base, [base + delta for delta in deltas], alpha=1.5)
    merged = (result - base) / 1.5

    total = sum(deltas)
    u, s, vh = torch.linalg.svd(total, full_matrices=False)
    singular_values = torch.linalg.svdvals(merged)
    torch.testing.assert_close(singular_values, torch.full((6,), s.mean().item()), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(merged, s.mean() * u @ vh, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("rank", "tasks", "fraction", "expected"),
    [
        (10, 2, 0.8, (8, 1)),
        (100, 4, 0.8, (80, 5)),
        (10, 3, 0.8, (7, 1)),
        (10, 5, 0.8, (10, 0)),
        (5, 3, 0.0, (2, 1)),
        (10, 2, 1.0, (10, 0)),
    ],
)
def test_iso_cts_ranks(rank: int, tasks: int, fraction: float, expected: tuple[int, int]) -> None:
    assert iso_cts_ranks(rank, tasks, fraction) == expected


def test_iso_cts_common_subspace_and_spectrum() -> None:
    generator = torch.Generator().manual_seed(9)
    base = torch.zeros(12, 10)
    deltas = [torch.randn(12, 10, generator=generator) for _ in range(2)]
    merged = merge("iso_cts", base, deltas)

    # r = 10, T = 2: common rank floor(0.8 * 10) = 8, one direction per task.
    u, s, _ = torch.linalg.svd(deltas[0] + deltas[1], full_matrices=False)
    common = u[:, :8]
    merged_u, merged_s, _ = torch.linalg.svd(merged, full_matrices=False)
    projection = merged_u @ merged_u.T
    torch.testing.assert_close(projection @ common, common, atol=1e-4, rtol=0)

    task_sigmas = []
    for delta in deltas:
        specific = delta - common @ common.T @ delta
        specific_u, specific_s, _ = torch.linalg.svd(specific, full_matrices=False)
        task_sigmas.append(specific_s[:1])
        # Each task contributes its top direction outside the common subspace.
        top = specific_u[:, :1]
        torch.testing.assert_close(projection @ top, top, atol=1e-4, rtol=0)
    mean_sigma = torch.cat(task_sigmas + [s[:8]]).mean()
    torch.testing.assert_close(merged_s, torch.full((10,), mean_sigma.item()), atol=1e-4, rtol=1e-5)


def test_iso_cts_full_common_fraction_equals_iso_c() -> None:
    generator = torch.Generator().manual_seed(10)
    base = torch.randn(8, 6, generator=generator)
    models = [base + torch.randn(8, 6, generator=generator) for _ in range(3)]
    iso_c = merge("iso_c", base, models)
    iso_cts = merge("iso_cts", base, models, common_space_fraction=1.0)
    torch.testing.assert_close(iso_cts, iso_c, atol=1e-5, rtol=1e-5)


# Devices


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize(
    ("method", "shared"),
    [("ties", {}), ("ties", {"rescale": 1.0}), ("dare_ties", {}), ("dare_linear", {}), ("tsv", {}), ("iso_cts", {})],
)
def test_cuda_matches_cpu(method: str, shared: dict[str, float]) -> None:
    # 64 x 4200 entries: above the sampled-selection size, so TIES takes its block path.
    generator = torch.Generator().manual_seed(11)
    base = torch.randn(64, 4200, generator=generator).to(torch.bfloat16)
    models = [(base.float() + torch.randn(64, 4200, generator=generator)).to(torch.bfloat16) for _ in range(3)]
    if method not in ("ties",):
        base, models = base.float(), [model.float() for model in models]
    parameters = [{"density": 0.4}] * 3 if method in ("ties", "dare_ties", "dare_linear") else None
    cpu = merge(method, base, models, parameters, seed=4, **shared)
    cuda = merge(method, base.cuda(), [model.cuda() for model in models], parameters, seed=4, **shared)
    torch.testing.assert_close(cuda.cpu(), cpu, atol=1e-4, rtol=1e-4)
