"""Sparsification masks for task vectors and the L1 rescale that DARE applies."""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch

# Norms below this are treated as zero, so the rescale is skipped (mergekit 0.1.5 uses
# the same threshold).
RESCALE_EPSILON = 1e-7


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
    if density >= 1.0:
        return None
    if density <= 0.0 or magnitudes.numel() == 0:
        return torch.zeros(magnitudes.shape, dtype=torch.bool, device=magnitudes.device)

    keep_count = max(1, int(density * magnitudes.numel()))
    flat = magnitudes.reshape(-1)
    selection = kth_largest(flat, keep_count)
    threshold = selection.value
    if selection.at_or_above == keep_count:
        # No tie crosses the cut: the entries at or above the threshold are exactly the kept ones.
        return (flat >= threshold).reshape(magnitudes.shape)
    mask = flat > threshold
    missing = keep_count - selection.above
    tied = torch.nonzero(flat == threshold).squeeze(1)
    mask[tied[:missing]] = True
    return mask.reshape(magnitudes.shape)


# Below this many entries torch.kthvalue is used directly.
SAMPLED_SELECTION_MIN = 1 << 20
SELECTION_SAMPLE = 1 << 16
# The bracket around the sample quantile spans this many standard errors on each side.
# By the normal approximation, the k-th largest value falls outside it with a
# probability near 1e-6. The result is exact either way, because a miss falls back to
# a full kthvalue.
SELECTION_BRACKET_SIGMAS = 5.0


@dataclass(frozen=True)
class Selection:
    """The k-th largest entry of a tensor and the counts of entries above it and at or above it."""

    value: torch.Tensor
    above: int
    at_or_above: int


def kth_largest(flat: torch.Tensor, count: int, sample_size: int = SELECTION_SAMPLE) -> Selection:
    """Return the `count`-th largest entry of a 1-D tensor and the counts of entries above and at or above it.

    For a large tensor, a random sample of `sample_size` entries brackets the value
    between two sample quantiles. Entries above the bracket are counted, and the value
    is the matching rank among the few entries inside it. That takes a few cheap passes
    over the tensor instead of torch.kthvalue's selection over all of it, about twice as
    fast on one CPU thread. The result is exact: when the bracket misses, it falls back
    to torch.kthvalue.
    """
    total = flat.numel()
    if total < SAMPLED_SELECTION_MIN or sample_size >= total:
        return _counted(flat, torch.kthvalue(flat, total - count + 1).values)

    # A fixed seed keeps runs reproducible; correctness does not depend on the sample.
    generator = torch.Generator().manual_seed(total)
    indices = torch.randint(0, total, (sample_size,), generator=generator).to(flat.device)
    sample = flat[indices]
    quantile = 1.0 - count / total
    margin = SELECTION_BRACKET_SIGMAS * math.sqrt(max(quantile * (1.0 - quantile), 1.0 / sample_size) / sample_size)
    low_rank = max(1, math.floor((quantile - margin) * sample_size))
    high_rank = min(sample_size, math.ceil((quantile + margin) * sample_size) + 1)
    low = torch.kthvalue(sample, low_rank).values
    high = torch.kthvalue(sample, high_rank).values

    above_band = int((flat > high).sum())
    band = flat[(flat >= low) & (flat <= high)]
    needed = count - above_band
    if not 0 < needed <= band.numel():
        return _counted(flat, torch.kthvalue(flat, total - count + 1).values)
    value = torch.kthvalue(band, band.numel() - needed + 1).values
    return Selection(value, above_band + int((band > value).sum()), above_band + int((band >= value).sum()))


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
