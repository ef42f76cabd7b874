"""Sparsification masks for task vectors and the L1 rescale that DARE applies."""

from __future__ import annotations

import functools
import hashlib
import math
from dataclasses import dataclass
from typing import Protocol

import torch
from torch.nn import functional

from mergekit_ext.methods import fused

# Norms below this are treated as zero, so the rescale is skipped (mergekit 0.1.5 uses
# the same threshold).
RESCALE_EPSILON = 1e-7
# Block size of the selection and merge passes: 1 MiB of float32 per temporary, so the
# temporaries of a block stay in the CPU caches.
BLOCK_ELEMENTS = 1 << 18


def magnitude_mask(delta: torch.Tensor, density: float) -> torch.Tensor | None:
    """Mask all but the int(density * numel) largest |delta| entries (at least one).

    Returns None, meaning keep all, for density >= 1. Among entries tied at the cut,
    those with the lower flat index are kept.
    """
    if density >= 1.0:
        return None
    return top_magnitude_mask(delta.abs(), density)


def top_magnitude_mask(magnitudes: torch.Tensor, density: float) -> torch.Tensor | None:
    """Mask all but the largest entries, as `magnitude_mask` does, given |delta| (no NaN)."""
    cut = magnitude_cut(StoredMagnitudes(magnitudes.reshape(-1)), density)
    if cut is None:
        return None
    return cut.mask(magnitudes.reshape(-1)).reshape(magnitudes.shape)


class Magnitudes(Protocol):
    """Non-negative entries of a flat tensor, readable whole, by index or block by block."""

    def numel(self) -> int:
        """Return the number of entries."""
        ...

    def at(self, indices: torch.Tensor) -> torch.Tensor:
        """Return the entries at `indices`, in float32."""
        ...

    def block(self, part: slice) -> torch.Tensor:
        """Return the entries of one contiguous block, in float32."""
        ...


@dataclass(frozen=True)
class StoredMagnitudes:
    """Magnitudes already held in a flat tensor."""

    values: torch.Tensor

    def numel(self) -> int:
        """Return the number of entries."""
        return self.values.numel()

    def at(self, indices: torch.Tensor) -> torch.Tensor:
        """Return the entries at `indices`."""
        return self.values[indices.to(self.values.device)]

    def block(self, part: slice) -> torch.Tensor:
        """Return a view of one contiguous block."""
        return self.values[part]


@dataclass
class TaskVectorMagnitudes:
    """|model - base| of two flat tensors, computed in float32 only where it is read.

    The inputs stay in their stored dtype (bf16, say), so a float32 copy as large as
    the tensor is never made: selection and merge read it block by block. A selection
    by the fused kernels sets `finite_checked` once its pass has found every entry of
    both inputs finite, and raises `NonFiniteMagnitudes` where it found one that is not.
    """

    model: torch.Tensor
    base: torch.Tensor
    finite_checked: bool = False

    def numel(self) -> int:
        """Return the number of entries."""
        return self.base.numel()

    def at(self, indices: torch.Tensor) -> torch.Tensor:
        """Return |model - base| at `indices`."""
        indices = indices.to(self.base.device)
        return torch.sub(self.model[indices].float(), self.base[indices].float()).abs_()

    def block(self, part: slice) -> torch.Tensor:
        """Return |model - base| over one contiguous block."""
        return torch.sub(self.model[part].float(), self.base[part].float()).abs_()


class NonFiniteMagnitudes(Exception):
    """A selection pass found NaN or Inf in the base (`in_base`) or else in the model of `TaskVectorMagnitudes`."""

    def __init__(self, in_base: bool) -> None:
        super().__init__("NaN or Inf in the " + ("base" if in_base else "model"))
        self.in_base = in_base


def float32_below(value: float) -> float:
    """Return the largest float32 below `value`: for float32 x, |x| > it exactly when |x| >= value."""
    return float(torch.nextafter(torch.tensor(value, dtype=torch.float32), torch.tensor(-math.inf)))


def block_slices(total: int, block_elements: int = BLOCK_ELEMENTS) -> list[slice]:
    """Split range(total) into contiguous slices of at most `block_elements` entries."""
    return [slice(start, min(start + block_elements, total)) for start in range(0, total, block_elements)]


@dataclass(frozen=True)
class MagnitudeCut:
    """The entries a top-k magnitude mask keeps: those above `value`, and ties before `tie_end`.

    Entries equal to `value` are kept only at flat indices below `tie_end`, so the
    tied entries kept are the first ones in flat order. `above` counts the entries
    above `value`. The cut applies to any block on its own, in any order.
    """

    value: torch.Tensor
    above: int
    tie_end: int

    def mask(self, magnitudes: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Return the mask of kept entries for the block of magnitudes beginning at flat index `start`."""
        split = min(max(self.tie_end - start, 0), magnitudes.numel())
        return torch.cat([magnitudes[:split] >= self.value, magnitudes[split:] > self.value])

    def thresholds(self) -> tuple[float, float]:
        """Return the |delta| thresholds that kept entries exceed: from `tie_end` on, and before it.

        Before `tie_end` the threshold is the largest float32 below the value, so
        entries equal to the value are kept there.
        """
        value = float(self.value)
        return value, float32_below(value)

    def select(self, delta: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Return the float32 task vector block beginning at `start` with dropped entries set to zero.

        Same as `delta * mask(delta.abs(), start)`, with float operations only
        (hardshrink zeroes |x| <= its threshold). On the development CPU that took 25 µs
        per 262144 entries, against about 290 µs for a boolean mask and a multiply.
        """
        split = min(max(self.tie_end - start, 0), delta.numel())
        value, below_value = self.thresholds()
        if split == delta.numel():
            return functional.hardshrink(delta, below_value)
        if split == 0:
            return functional.hardshrink(delta, value)
        return torch.cat([functional.hardshrink(delta[:split], below_value), functional.hardshrink(delta[split:], value)])


def magnitude_cut(magnitudes: Magnitudes, density: float) -> MagnitudeCut | None:
    """Return the cut that keeps the int(density * numel) largest magnitudes (at least one).

    Returns None, meaning keep all, for density >= 1. Among entries tied at the cut,
    those with the lower flat index are kept.
    """
    if density >= 1.0:
        return None
    total = magnitudes.numel()
    if density <= 0.0 or total == 0:
        return MagnitudeCut(torch.tensor(math.inf), 0, 0)
    keep_count = max(1, int(density * total))
    selection = kth_largest(magnitudes, keep_count)
    if selection.at_or_above == keep_count:
        # No tie crosses the cut: the entries at or above the value are exactly the kept ones.
        return MagnitudeCut(selection.value, selection.above, total)
    if selection.last_tie is not None:
        return MagnitudeCut(selection.value, selection.above, selection.last_tie + 1)
    tie_end = _tie_end(magnitudes, selection, keep_count - selection.above)
    return MagnitudeCut(selection.value, selection.above, tie_end)


def _tie_end(magnitudes: Magnitudes, selection: Selection, tied: int) -> int:
    """Return one past the flat index of the `tied`-th entry equal to the selected value."""
    remaining = tied
    for index, part in enumerate(block_slices(magnitudes.numel())):
        if selection.equal_by_block is not None and selection.equal_by_block[index] < remaining:
            remaining -= selection.equal_by_block[index]
            continue
        positions = torch.nonzero(magnitudes.block(part) == selection.value).squeeze(1)
        if positions.numel() >= remaining:
            return part.start + int(positions[remaining - 1]) + 1
        remaining -= positions.numel()
    raise AssertionError("fewer entries equal to the selected value than counted")


# Below this many entries torch.kthvalue is used directly.
SAMPLED_SELECTION_MIN = 1 << 16
SELECTION_SAMPLE = 1 << 16
SELECTION_SAMPLE_MAX = 1 << 18
# The bracket around the sample quantile spans this many standard errors on each side.
# By the normal approximation, the k-th largest value falls outside it with a
# probability near 1e-6. The result is exact either way, because a miss falls back to
# a full kthvalue.
SELECTION_BRACKET_SIGMAS = 5.0
# The bit pattern of float32 infinity, the bracket's top where the sample reaches the largest bin.
INFINITY_BITS = 0x7F800000


@dataclass(frozen=True)
class Selection:
    """The k-th largest entry of a tensor and the counts of entries above it and at or above it."""

    value: torch.Tensor
    above: int
    at_or_above: int
    # Entries equal to the value in each block of `block_slices`, when a tie crosses
    # the cut and the sampled path counted them (None: not counted).
    equal_by_block: tuple[int, ...] | None = None
    # The flat index of the last entry equal to the value among the `count` largest,
    # when a tie crosses the cut and the fused kernels found it (None: not found).
    last_tie: int | None = None


def kth_largest(
    values: torch.Tensor | Magnitudes, count: int, sample_size: int | None = None
) -> Selection:
    """Return the `count`-th largest entry and the counts of entries above and at or above it.

    `values` is a 1-D tensor, or magnitudes computed block by block. For many entries,
    a random sample of `sample_size` entries brackets the value between two sample
    quantiles. Entries above the bracket are counted, and the value is the matching
    rank among the few entries inside it. That takes one pass over the blocks instead
    of torch.kthvalue's selection over all entries, about twice as fast on one CPU
    thread, and never holds more than a block and the bracket's entries. The result
    is exact: when the bracket misses, it falls back to torch.kthvalue. By default the
    sample grows with the tensor (`selection_sample_size`).
    """
    source = StoredMagnitudes(values) if isinstance(values, torch.Tensor) else values
    total = source.numel()
    if sample_size is None:
        sample_size = selection_sample_size(total)
    if total < SAMPLED_SELECTION_MIN or sample_size >= total:
        return _full_selection(source, count)

    positions = _sample_positions(total, sample_size)
    pair = _fused_pair(source)
    sample = source.at(positions) if pair is None else fused.magnitudes_at(*pair, positions)
    quantile = 1.0 - count / total
    margin = SELECTION_BRACKET_SIGMAS * math.sqrt(max(quantile * (1.0 - quantile), 1.0 / sample_size) / sample_size)
    low_rank = max(1, math.floor((quantile - margin) * sample_size))
    high_rank = min(sample_size, math.ceil((quantile + margin) * sample_size) + 1)
    if pair is not None:
        return _fused_selection(pair, source, count, sample, (low_rank, high_rank))
    low = torch.kthvalue(sample, low_rank).values
    high = torch.kthvalue(sample, high_rank).values
    if bool(low == high):
        return _single_value_band(source, count, low)

    above_band = 0
    bands = []
    for part in block_slices(total):
        block = source.block(part)
        above_band += _count_above(block, float(high))
        bands.append(block[(block >= low) & (block <= high)])
    band = torch.cat(bands)
    needed = count - above_band
    if not 0 < needed <= band.numel():
        return _full_selection(source, count)
    value = torch.kthvalue(band, band.numel() - needed + 1).values
    above = above_band + int((band > value).sum())
    at_or_above = above_band + int((band >= value).sum())
    if at_or_above == count:
        return Selection(value, above, at_or_above)
    # A tie crosses the cut: count the equal entries per block from the band entries,
    # so the position of the last tie kept is found without another full pass.
    equal_by_block = tuple(int((block_band == value).sum()) for block_band in bands)
    return Selection(value, above, at_or_above, equal_by_block)


@functools.lru_cache(maxsize=64)
def _sample_positions(total: int, sample_size: int) -> torch.Tensor:
    """Return the flat positions of the selection sample: one random entry in each of `sample_size` equal strides.

    A stratified sample reads memory in increasing order: 0.4 ms against 0.65 ms for
    uniform draws from 136M bf16 entries, measured. The seed is the tensor size, so
    runs are reproducible and tensors of one shape share the positions (the result
    does not depend on the sample). Callers must not modify the tensor.
    """
    generator = torch.Generator().manual_seed(total)
    stride = total // sample_size
    return torch.arange(sample_size) * stride + torch.randint(0, stride, (sample_size,), generator=generator)


def _single_value_band(source: Magnitudes, count: int, value: torch.Tensor) -> Selection:
    """Select the value when both sample quantiles are equal, as often with bf16 task vectors.

    Counting the entries above the value and at or above it is then enough; no
    entry needs to be extracted.
    """
    below_value = float32_below(float(value))
    zero = float(value) == 0.0
    above = 0
    equal_by_block = []
    for part in block_slices(source.numel()):
        block = source.block(part)
        block_above = _count_above(block, float(value))
        # Every entry is >= 0, so at a zero value the rest of the block ties.
        at_or_above = block.numel() if zero else _count_above(block, below_value)
        equal_by_block.append(at_or_above - block_above)
        above += block_above
    at_or_above = above + sum(equal_by_block)
    if not above < count <= at_or_above:
        return _full_selection(source, count)
    return Selection(value, above, at_or_above, None if at_or_above == count else tuple(equal_by_block))


def selection_sample_size(total: int) -> int:
    """Return the sample size for `total` entries: one in 512, between SELECTION_SAMPLE and SELECTION_SAMPLE_MAX.

    The bracket's width falls with the square root of the sample, and with it the
    number of entries that the pass collects: a 262144-entry sample (the 136M-entry
    embedding table of Qwen2-0.5B) gives half the band of a 65536-entry one. Tensors
    below 524288 entries take one entry in 8 instead, because gathering the sample
    then costs more than the wider band. Measured on Qwen2-0.5B weights (bf16,
    density 0.5): the 114688-entry key projection selected in 0.55 to 0.62 ms with
    4096 to 16384 entries and 0.79 ms with 65536, while the 4.36M-entry MLP weights
    took 3.1 ms with 65536 and 8.3 ms with 32768.
    """
    return min(max(min(SELECTION_SAMPLE, total >> 3), total >> 9), SELECTION_SAMPLE_MAX)


def _fused_pair(source: Magnitudes) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Return (model, base) when the fused kernels can compute these magnitudes, else None."""
    if isinstance(source, TaskVectorMagnitudes) and fused.accepts([source.model, source.base]):
        return source.model, source.base
    return None


def _fused_selection(
    pair: tuple[torch.Tensor, torch.Tensor],
    source: Magnitudes,
    count: int,
    sample: torch.Tensor,
    ranks: tuple[int, int],
) -> Selection:
    """Select with one fused pass that counts the entries above a bracket and collects those inside.

    The bracket spans the sample entries of ranks `ranks`, widened to whole bins of
    their upper 16 bits. Non-negative float32 values order as their bit patterns, so
    a bincount finds the bins without sorting: 0.08 ms against 1.8 ms for two
    kthvalue calls on a 65536-entry sample. The sample's most frequent value in the
    bin of the quantile is counted by the pass, not collected (`fused.band`).
    """
    bins = sample.view(torch.int32) >> 16
    cumulative = torch.bincount(bins).cumsum(0)
    low_rank, high_rank = ranks
    low_bin, middle_bin, high_bin = torch.searchsorted(
        cumulative, torch.tensor([low_rank, (low_rank + high_rank) // 2, high_rank])
    ).tolist()
    low = _float32_from_bits(low_bin << 16)
    high = _float32_from_bits(min((high_bin << 16) | 0xFFFF, INFINITY_BITS))
    levels, level_counts = torch.unique(sample[bins == middle_bin], return_counts=True)
    most_frequent = int(level_counts.argmax())
    tie = float(levels[most_frequent]) if int(level_counts[most_frequent]) > 1 else -1.0
    bracketed = int(cumulative[high_bin]) - (int(cumulative[low_bin - 1]) if low_bin else 0)
    if tie >= 0.0:
        bracketed -= int(level_counts[most_frequent])
    capacity = 2 * source.numel() * bracketed // sample.numel() + fused.CHUNK
    band = fused.band(*pair, low, high, capacity, tie)
    if band.non_finite:
        # A NaN or Inf input entry, unless a difference of finite entries overflowed.
        model, base = pair
        if not fused.all_finite(base):
            raise NonFiniteMagnitudes(in_base=True)
        if not fused.all_finite(model):
            raise NonFiniteMagnitudes(in_base=False)
    if isinstance(source, TaskVectorMagnitudes):
        source.finite_checked = True

    needed = count - band.above
    values = band.values
    if not 0 < needed <= values.numel() + band.ties:
        return _full_selection(source, count)
    greater = int((values > tie).sum())
    if greater < needed <= greater + band.ties:
        # The value is the tie value: its entries were counted, not collected.
        value = torch.tensor(tie, dtype=torch.float32)
        above = band.above + greater
        at_or_above = above + band.ties
        if at_or_above == count:
            return Selection(value, above, at_or_above)
        return Selection(value, above, at_or_above, last_tie=_nth_tie(source, band.chunk_ties, value, count - above))
    # The value is a collected one; the tie value's entries rank above it or below it.
    rank = needed if needed <= greater else needed - band.ties
    value = torch.kthvalue(values, values.numel() - rank + 1).values
    ties_above = band.ties if tie > float(value) else 0
    above = band.above + ties_above + int((values > value).sum())
    at_or_above = band.above + ties_above + int((values >= value).sum())
    if at_or_above == count:
        return Selection(value, above, at_or_above)
    # The band contains every entry equal to the value, in flat order.
    tied = band.positions[values == value]
    return Selection(value, above, at_or_above, last_tie=int(tied[count - above - 1]))


def _nth_tie(source: Magnitudes, chunk_ties: torch.Tensor, value: torch.Tensor, n: int) -> int:
    """Return the flat index of the `n`-th entry equal to `value`, given the count of such entries per chunk."""
    cumulative = chunk_ties.cumsum(0)
    chunk = int(torch.searchsorted(cumulative, torch.tensor([n]))[0])
    before = int(cumulative[chunk - 1]) if chunk else 0
    part = slice(chunk * fused.CHUNK, min((chunk + 1) * fused.CHUNK, source.numel()))
    equal = torch.nonzero(source.block(part) == value).squeeze(1)
    return part.start + int(equal[n - before - 1])


def _float32_from_bits(bits: int) -> float:
    return float(torch.tensor([bits], dtype=torch.int32).view(torch.float32)[0])


def _count_above(block: torch.Tensor, threshold: float) -> int:
    """Count the entries of a non-negative block above `threshold` (>= 0) with float operations.

    functional.threshold keeps x > threshold (all positive) and zeroes the rest, and
    sign turns the kept entries into ones. Measured on the development CPU: 83 µs per
    262144 entries, against 165 µs for a comparison and a sum.
    """
    return int(torch.sign(functional.threshold(block, threshold, 0.0)).sum())


def _full_selection(source: Magnitudes, count: int) -> Selection:
    flat = source.block(slice(None))
    return _counted(flat, torch.kthvalue(flat, flat.numel() - count + 1).values)


def _counted(flat: torch.Tensor, value: torch.Tensor) -> Selection:
    return Selection(value, int((flat > value).sum()), int((flat >= value).sum()))


def bernoulli_mask(
    shape: torch.Size, density: float, generator: torch.Generator, device: torch.device
) -> torch.Tensor | None:
    """Draw a mask that keeps each entry independently with probability density.

    Returns None, meaning keep all, for density >= 1. The draw happens on the CPU
    generator, so CPU and CUDA merges get the same mask.
    """
    if density >= 1.0:
        return None
    probabilities = torch.full(tuple(shape), density, dtype=torch.float32)
    mask = torch.bernoulli(probabilities, generator=generator)
    return mask.to(device=device, dtype=torch.bool)


def l1_rescale_factor(delta: torch.Tensor, mask: torch.Tensor) -> torch.Tensor | None:
    """Return ||delta||_1 / ||delta * mask||_1, or None when either norm is below 1e-7.

    DARE rescales the kept entries to the original L1 norm instead of by 1/density.
    """
    norm_before = delta.abs().sum()
    norm_after = (delta * mask).abs().sum()
    if norm_before < RESCALE_EPSILON or norm_after < RESCALE_EPSILON:
        return None
    return norm_before / norm_after


def cut_l1_rescale_factor(magnitudes: Magnitudes, cut: MagnitudeCut) -> torch.Tensor | None:
    """Return `l1_rescale_factor` for the mask that `cut` gives, summed block by block."""
    norm_before = 0.0
    norm_after = 0.0
    for part in block_slices(magnitudes.numel()):
        block = magnitudes.block(part)
        norm_before += float(block.sum(dtype=torch.float64))
        norm_after += float(cut.select(block, part.start).sum(dtype=torch.float64))
    if norm_before < RESCALE_EPSILON or norm_after < RESCALE_EPSILON:
        return None
    return torch.tensor(norm_before / norm_after, dtype=torch.float32)


def apply_mask(
    delta: torch.Tensor, mask: torch.Tensor | None, scale: torch.Tensor | None
) -> torch.Tensor:
    """Return delta with dropped entries zeroed and the rest multiplied by scale."""
    if mask is None:
        return delta
    kept = delta * mask
    if scale is None:
        return kept
    return kept * scale


def tensor_generator(seed: int, tensor_name: str) -> torch.Generator:
    """Return a CPU generator seeded from (seed, tensor name), independent of merge order.

    The seed is the first 8 bytes (little-endian) of SHA-256 of "{seed}:{tensor_name}".
    """
    generator = torch.Generator(device="cpu")
    generator.manual_seed(tensor_seed(seed, tensor_name))
    return generator


def tensor_seed(seed: int, tensor_name: str) -> int:
    """Return the 64-bit seed of one tensor's random draws."""
    digest = hashlib.sha256(f"{seed}:{tensor_name}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little")
