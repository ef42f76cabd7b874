"""The fused numba kernels against the torch path and against direct torch computations."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from numba import njit

from mergekit_ext.errors import NonFiniteInputError
from mergekit_ext.methods import TensorMergeInput, fused, get_method
from mergekit_ext.methods.sparsify import TaskVectorMagnitudes, kth_largest, magnitude_cut


def bf16_inputs(size: int, models: int, seed: int, steps: int = 6) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A bf16 base and models whose task vectors lie on a coarse grid, so cuts fall inside ties."""
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(size, generator=generator).to(torch.bfloat16)
    return base, [
        (base.float() + torch.randint(-steps, steps + 1, (size,), generator=generator) / 64).to(torch.bfloat16)
        for _ in range(models)
    ]


def ties(
    base: torch.Tensor, models: list[torch.Tensor], parameters: list[dict[str, float]], **shared: object
) -> torch.Tensor:
    merge_input = TensorMergeInput(
        name="t", base=base, models=models, model_parameters=parameters, parameters=dict(shared), seed=0
    )
    return get_method("ties").merge(merge_input)


def recording(function: Callable[..., Any], name: str, calls: list[str]) -> Callable[..., Any]:
    """Wrap `function` so that each call appends `name` to `calls`."""

    def wrapper(*args: Any) -> Any:
        calls.append(name)
        return function(*args)

    return wrapper


def test_kernels_are_enabled_here() -> None:
    # numba is a dependency: without it every test below would compare the torch path with itself.
    assert fused.enabled()


@pytest.mark.parametrize(
    ("dtype", "density", "shared"),
    [
        (torch.bfloat16, 0.5, {}),
        (torch.bfloat16, 0.1, {"lambda": 0.7, "rescale": True}),
        (torch.bfloat16, 0.9, {"normalize": False}),
        (torch.float32, 0.3, {"lambda": 1.3}),
    ],
)
def test_fused_ties_matches_torch_bitwise(
    monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype, density: float, shared: dict[str, object]
) -> None:
    # Above PARALLEL_MIN_ELEMENTS, so the selections run side by side and the merge in parts.
    size = fused.PARALLEL_MIN_ELEMENTS + 3 * fused.CHUNK + 17
    base, models = bf16_inputs(size, 4, seed=11)
    base, models = base.to(dtype), [model.to(dtype) for model in models]
    if dtype == torch.float32:
        models = [model + torch.randn(size, generator=torch.Generator().manual_seed(i)) * 1e-3
                  for i, model in enumerate(models)]
    parameters = [{"weight": weight, "density": density} for weight in (0.3, 1.25, -0.75, 0.5)]
    fast = ties(base, models, parameters, **shared)
    monkeypatch.setenv(fused.KERNELS_ENV, "torch")
    assert not fused.accepts([base])
    slow = ties(base, models, parameters, **shared)
    assert torch.equal(fast.view(torch.int32), slow.view(torch.int32))


def test_band_matches_torch() -> None:
    base, (model,) = bf16_inputs(50_000, 1, seed=3)
    magnitudes = (model.float() - base.float()).abs()
    low, high = 2 / 64, 4 / 64
    inside = (magnitudes >= low) & (magnitudes <= high)
    # Capacity to spare, and too little: a second pass then collects what the first counted.
    for capacity in (50_000, int(inside.sum()) // 3):
        band = fused.band(model, base, low, high, capacity=capacity)
        assert band.above == int((magnitudes > high).sum())
        assert torch.equal(band.positions, torch.nonzero(inside).squeeze(1))
        assert torch.equal(band.values, magnitudes[inside])
        assert band.ties == 0


def test_band_counts_the_tie_value_per_chunk() -> None:
    base, (model,) = bf16_inputs(30_001, 1, seed=4)
    magnitudes = (model.float() - base.float()).abs()
    low, tie, high = 2 / 64, 3 / 64, 4 / 64
    band = fused.band(model, base, low, high, capacity=30_001, tie=tie)
    equal = magnitudes == tie
    collected = (magnitudes >= low) & (magnitudes <= high) & ~equal
    assert band.above == int((magnitudes > high).sum())
    assert torch.equal(band.positions, torch.nonzero(collected).squeeze(1))
    assert torch.equal(band.values, magnitudes[collected])
    assert band.ties == int(equal.sum()) > 0
    per_chunk = torch.nn.functional.pad(equal, (0, -equal.numel() % fused.CHUNK)).reshape(-1, fused.CHUNK).sum(1)
    assert torch.equal(band.chunk_ties, per_chunk)


@pytest.mark.parametrize("steps", [1, 2000])
def test_fused_selection_kth_and_last_tie(monkeypatch: pytest.MonkeyPatch, steps: int) -> None:
    # One step: every |delta| is 0 or 1/64, so both sample quantiles are one value.
    # 2000 steps: many values, still with ties from the bf16 rounding.
    size = fused.MIN_ELEMENTS + 12_345
    base, (model,) = bf16_inputs(size, 1, seed=steps, steps=steps)
    magnitudes = (model.float() - base.float()).abs()
    # Record the fused passes and how many entries each counted as ties.
    calls: list[str] = []
    real_band = fused.band

    def band(*args: Any) -> fused.Band:
        result = real_band(*args)
        calls.append("ties" if result.ties else "band")
        return result

    monkeypatch.setattr(fused, "band", band)
    for count in (1, size // 3, size // 2, size - 7):
        selection = kth_largest(TaskVectorMagnitudes(model, base), count)
        value = torch.sort(magnitudes, descending=True).values[count - 1]
        assert torch.equal(selection.value, value)
        assert selection.above == int((magnitudes > value).sum())
        assert selection.at_or_above == int((magnitudes >= value).sum())
        tied = torch.nonzero(magnitudes == value).squeeze(1)
        if selection.last_tie is not None:
            assert selection.last_tie == int(tied[count - selection.above - 1])
        # The cut keeps the first tied entries in flat order, whichever path found the value.
        density = count / size
        cut = magnitude_cut(TaskVectorMagnitudes(model, base), density)
        assert cut is not None
        keep = max(1, int(density * size))
        expected = torch.zeros(size, dtype=torch.bool)
        expected[torch.sort(magnitudes, descending=True, stable=True).indices[:keep]] = True
        assert torch.equal(cut.mask(magnitudes), expected)
    # The cut falls on a tied value, which the pass counts: always with one step (1/64).
    assert "ties" in calls
    if steps == 1:
        assert "band" not in calls


def test_accepts_supported_inputs_only() -> None:
    flat = torch.zeros(fused.MIN_ELEMENTS, dtype=torch.bfloat16)
    assert fused.accepts([flat, flat.clone()])
    assert not fused.accepts([flat, flat.float()])
    assert not fused.accepts([flat.half()])
    assert not fused.accepts([torch.zeros(fused.MIN_ELEMENTS, 2, dtype=torch.bfloat16)[:, 0]])
    assert not fused.accepts([flat[: fused.MIN_ELEMENTS - 1]])
    assert not fused.accepts([])


def test_split_parts_are_chunk_aligned(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fused, "usable_cores", lambda: 3)
    assert fused.split(10) == [slice(0, 10)]
    total = fused.PARALLEL_MIN_ELEMENTS + 5
    parts = fused.split(total)
    assert len(parts) == 3
    assert parts[0].start == 0
    assert parts[-1].stop == total
    assert all(a.stop == b.start for a, b in zip(parts, parts[1:]))
    assert all(part.start % fused.CHUNK == 0 for part in parts)


@pytest.mark.parametrize(
    ("dtype", "weights", "shared"),
    [
        (torch.bfloat16, (0.3, 1.25, -0.75, 0.5), {}),
        (torch.bfloat16, (0.3, 0.7, 0.2), {"normalize": True, "lambda": 0.9}),
        (torch.float32, (0.5, -0.5), {"normalize": True}),
        (torch.float32, (0.1, 0.2, 0.3, 0.4), {"lambda": 1.7}),
    ],
)
def test_fused_task_arithmetic_matches_torch(
    monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype, weights: tuple[float, ...], shared: dict[str, object]
) -> None:
    # (0.5, -0.5) sums to zero, where normalizing divides by 1 instead.
    size = fused.PARALLEL_MIN_ELEMENTS + fused.CHUNK + 5
    base, models = bf16_inputs(size, len(weights), seed=12)
    base, models = base.to(dtype), [model.to(dtype) for model in models]
    merge_input = TensorMergeInput(
        name="t", base=base, models=models, model_parameters=[{"weight": w} for w in weights],
        parameters=dict(shared), seed=0,
    )
    fast = get_method("task_arithmetic").merge(merge_input)
    monkeypatch.setenv(fused.KERNELS_ENV, "torch")
    slow = get_method("task_arithmetic").merge(merge_input)
    assert fast.dtype == torch.float32
    assert torch.equal(fast.view(torch.int32), slow.view(torch.int32))


def test_missing_numba_keeps_torch_path(monkeypatch: pytest.MonkeyPatch) -> None:
    base, models = bf16_inputs(fused.MIN_ELEMENTS + 99, 2, seed=13)
    parameters = [{"weight": 0.6, "density": 0.4}, {"weight": 0.4, "density": 0.4}]
    fast = ties(base, models, parameters)
    monkeypatch.setattr(fused, "_compiled", lambda: None)
    assert not fused.enabled()
    assert not fused.accepts([base])
    slow = ties(base, models, parameters)
    assert torch.equal(fast.view(torch.int32), slow.view(torch.int32))
    with pytest.raises(RuntimeError, match="need numba"):
        fused.band(models[0], base, 0.5, 1.0, capacity=10)


def test_bf16_rounding_matches_torch() -> None:
    from mergekit_ext.methods import fused_numba

    # Halfway cases with an even and an odd last kept bit, values that round up into
    # the next power of two or to infinity, subnormals, signed zeros, and NaN.
    patterns = [0x3F808000, 0x3F818000, 0x3F808001, 0x3F807FFF, 0x3FFFFFFF, 0x7F7FFFFF, 0x7F7F8000,
                0x00008000, 0x00018000, 0x80000000, 0x00000000, 0xBF818000, 0xFF7FFFFF, 0x7FC00000, 0xFFC00001]
    generator = torch.Generator().manual_seed(5)
    random = torch.randint(0, 1 << 32, (10_000,), generator=generator, dtype=torch.int64)
    bits = torch.cat([torch.tensor(patterns, dtype=torch.int64), random]).to(torch.uint32)
    values = bits.view(torch.float32)
    output = torch.empty(values.numel(), dtype=torch.bfloat16)

    @njit
    def round_all(values: Any, output: Any) -> None:
        for k in range(values.shape[0]):
            output[k] = fused_numba._output_bits(values[k], True)

    round_all(values.numpy(), output.view(torch.uint16).numpy())
    assert torch.equal(output.view(torch.int16), values.to(torch.bfloat16).view(torch.int16))


@pytest.mark.parametrize("method", ["ties", "task_arithmetic"])
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16, None])
def test_fused_output_dtype_matches_torch(
    monkeypatch: pytest.MonkeyPatch, method: str, out_dtype: torch.dtype | None
) -> None:
    # A bf16 output is rounded inside the kernels, and any other stays float32 for the engine to convert.
    size = fused.PARALLEL_MIN_ELEMENTS + fused.CHUNK + 3
    base, models = bf16_inputs(size, 3, seed=14, steps=200)
    merge_input = TensorMergeInput(
        name="t", base=base, models=models,
        model_parameters=[{"weight": w, "density": 0.4} for w in (0.9, -0.4, 0.7)] if method == "ties"
        else [{"weight": w} for w in (0.9, -0.4, 0.7)],
        parameters={"lambda": 1.1}, seed=0, out_dtype=out_dtype,
    )
    fast = get_method(method).merge(merge_input)
    monkeypatch.setenv(fused.KERNELS_ENV, "torch")
    slow = get_method(method).merge(merge_input)
    assert slow.dtype == torch.float32
    assert fast.dtype == (torch.bfloat16 if out_dtype == torch.bfloat16 else torch.float32)
    expected = slow.to(fast.dtype)
    assert torch.equal(fast.view(torch.int16 if fast.dtype == torch.bfloat16 else torch.int32),
                       expected.view(torch.int16 if fast.dtype == torch.bfloat16 else torch.int32))


def test_fused_selection_cut_around_tie_value(monkeypatch: pytest.MonkeyPatch) -> None:
    from mergekit_ext.methods import sparsify

    # |delta| takes the 7 values k/64: a bracket over the whole sample contains them all,
    # and the pass counts the middle bin's most frequent value as ties. The cuts fall
    # above, on and below that value.
    size = fused.MIN_ELEMENTS + 999
    base, (model,) = bf16_inputs(size, 1, seed=21)
    magnitudes = (model.float() - base.float()).abs()
    source = TaskVectorMagnitudes(model, base)
    sample = source.at(torch.arange(0, size, 7))
    tie_values: list[float] = []
    real_band = fused.band

    def band(*args: Any) -> fused.Band:
        tie_values.append(args[-1])
        return real_band(*args)

    monkeypatch.setattr(fused, "band", band)
    descending = torch.sort(magnitudes, descending=True).values
    counts = (5, size // 7, size // 2, size - size // 7, size - 3)
    for count in counts:
        selection = sparsify._fused_selection((model, base), source, count, sample, (1, sample.numel()))
        value = descending[count - 1]
        assert torch.equal(selection.value, value)
        assert selection.above == int((magnitudes > value).sum())
        assert selection.at_or_above == int((magnitudes >= value).sum())
        tied = torch.nonzero(magnitudes == value).squeeze(1)
        assert selection.last_tie == int(tied[count - selection.above - 1])
    # The tie value lies strictly between the largest and smallest cuts tested.
    assert set(tie_values) == {tie_values[0]}
    assert float(descending[counts[-1] - 1]) < tie_values[0] < float(descending[counts[0] - 1])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_magnitudes_at_matches_torch(dtype: torch.dtype) -> None:
    base, (model,) = bf16_inputs(fused.MIN_ELEMENTS + 5, 1, seed=31)
    base, model = base.to(dtype), model.to(dtype)
    # More positions than one chunk, in increasing order as the selection sample has them.
    drawn = torch.randint(0, base.numel(), (3 * fused.CHUNK + 7,), generator=torch.Generator().manual_seed(3))
    positions = torch.sort(drawn).values
    expected = (model[positions].float() - base[positions].float()).abs()
    assert torch.equal(fused.magnitudes_at(model, base, positions), expected)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("where", ["base", 0, 1])
@pytest.mark.parametrize("densities", [(0.5, 0.5), (1.0, 0.5), (1.0, 1.0), (0.0, 1.0)])
def test_fused_ties_names_non_finite_input(bad: float, where: str | int, densities: tuple[float, float]) -> None:
    # Density 1 keeps a model out of the selection pass, so its own check must find it.
    base, models = bf16_inputs(fused.PARALLEL_MIN_ELEMENTS + 77, 2, seed=21)
    target = base if where == "base" else models[int(where)]
    target[fused.PARALLEL_MIN_ELEMENTS + 3] = bad
    parameters = [{"weight": 0.5, "density": density} for density in densities]
    with pytest.raises(NonFiniteInputError) as error:
        ties(base, models, parameters)
    assert error.value.model_index == (None if where == "base" else where)
    assert error.value.tensor_name == "t"


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("where", ["base", 0, 1, 2])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_task_arithmetic_names_non_finite_input(bad: float, where: str | int, dtype: torch.dtype) -> None:
    base, models = bf16_inputs(fused.PARALLEL_MIN_ELEMENTS + 77, 3, seed=22)
    base, models = base.to(dtype), [model.to(dtype) for model in models]
    target = base if where == "base" else models[int(where)]
    target[5] = bad
    # Model 1 has weight 0, and its NaN or Inf still reaches the output, because 0 * Inf is NaN.
    merge_input = TensorMergeInput(
        name="t", base=base, models=models, model_parameters=[{"weight": w} for w in (0.5, 0.0, 1.0)], seed=0
    )
    with pytest.raises(NonFiniteInputError) as error:
        get_method("task_arithmetic").merge(merge_input)
    assert error.value.model_index == (None if where == "base" else where)


def test_overflow_of_finite_inputs_is_kept() -> None:
    # Finite inputs whose task vectors overflow float32 are valid: the merges return what
    # the torch path returns instead of reporting a non-finite input.
    size = fused.PARALLEL_MIN_ELEMENTS + 77
    largest = torch.finfo(torch.bfloat16).max
    base = torch.zeros(size, dtype=torch.bfloat16)
    base[10] = -largest
    models = [torch.zeros(size, dtype=torch.bfloat16) for _ in range(2)]
    models[0][10] = largest
    models[1][11] = 1.0
    ta_input = TensorMergeInput(
        name="t", base=base, models=models, model_parameters=[{"weight": 1.0}, {"weight": 1.0}], seed=0
    )
    merged = get_method("task_arithmetic").merge(ta_input)
    assert merged[10] == float("inf")
    assert merged[11] == 1.0
    parameters = [{"weight": 1.0, "density": 0.5}, {"weight": 1.0, "density": 0.5}]
    merged = ties(base, models, parameters)
    assert merged[10] == float("inf")
    assert merged[11] == 1.0


def test_band_counts_non_finite_magnitudes() -> None:
    base, models = bf16_inputs(fused.PARALLEL_MIN_ELEMENTS + 77, 1, seed=23)
    model = models[0]
    assert fused.band(model, base, 0.1, 0.2, capacity=200_000).non_finite == 0
    model[3] = float("nan")
    base[99] = float("-inf")
    base[100] = float("inf")
    model[100] = float("inf")  # inf - inf is NaN
    assert fused.band(model, base, 0.1, 0.2, capacity=200_000).non_finite == 3
