"""Sparsification masks for task vectors and the L1 rescale that DARE applies."""

from __future__ import annotations

import hashlib

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
    # The keep_count-th largest magnitude, found without a full sort.
    threshold = torch.kthvalue(flat, flat.numel() - keep_count + 1).values
    mask = flat > threshold
    missing = keep_count - int(mask.sum())
    tied = torch.nonzero(flat == threshold).squeeze(1)
    mask[tied[:missing]] = True
    return mask.reshape(magnitudes.shape)


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
