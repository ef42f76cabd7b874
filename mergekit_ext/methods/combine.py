"""Weighted combination of (sparsified) task vectors shared by TA, TIES and DARE.

The sum runs model by model, so memory stays at a few tensors whatever the number
of models. Task vectors are recomputed from the inputs and their boolean masks
instead of being stored.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mergekit_ext.methods.consensus import consensus_merge
from mergekit_ext.methods.sparsify import apply_mask

# Without sign consensus, a weight sum this close to zero is replaced by 1 instead
# of dividing by it (mergekit 0.1.5 uses the same threshold).
WEIGHT_SUM_EPSILON = 1e-8
BLOCK_ELEMENTS = 1 << 20  # 4 MiB of float32 per temporary


def merge_task_vectors(
    base: torch.Tensor,
    models: Sequence[torch.Tensor],
    weights: Sequence[float],
    masks: Sequence[torch.Tensor | None],
    scales: Sequence[torch.Tensor | None],
    *,
    sign_consensus: bool,
    normalize: bool,
    scaling: float,
    block_elements: int = BLOCK_ELEMENTS,
) -> torch.Tensor:
    """Add scaling * (sum of w_i * masked task vector_i) to the base, optionally normalized.

    With sign consensus, only entries agreeing with the elected sign count, and the
    normalizing divisor is the sum of w_i over those entries (zeros replaced by 1).
    Without it, the divisor is the plain weight sum.

    Given the masks and scales, every entry depends only on the same entry of the
    inputs, so the work runs over blocks of `block_elements` entries. Temporaries then
    stay block-sized, and memory is reused from block to block instead of being
    allocated afresh for every temporary of a large tensor.
    """
    if not models:
        return base.clone()
    output = torch.empty(base.shape, dtype=base.dtype, device=base.device)
    flat_output = output.view(-1)
    flat_base = base.reshape(-1)
    flat_models = [model.reshape(-1) for model in models]
    flat_masks = [None if mask is None else mask.reshape(-1) for mask in masks]
    for start in range(0, flat_base.numel(), block_elements):
        block = slice(start, start + block_elements)
        flat_output[block] = _merge_block(
            flat_base[block],
            [model[block] for model in flat_models],
            weights,
            [None if mask is None else mask[block] for mask in flat_masks],
            scales,
            sign_consensus=sign_consensus,
            normalize=normalize,
            scaling=scaling,
        )
    return output


def _merge_block(
    base: torch.Tensor,
    models: Sequence[torch.Tensor],
    weights: Sequence[float],
    masks: Sequence[torch.Tensor | None],
    scales: Sequence[torch.Tensor | None],
    *,
    sign_consensus: bool,
    normalize: bool,
    scaling: float,
) -> torch.Tensor:
    if sign_consensus:
        weighted = [
            apply_mask(model.float() - base, mask, scale) * weight
            for model, mask, scale, weight in zip(models, masks, scales, weights)
        ]
        return consensus_merge(base, weighted, weights, normalize=normalize, scaling=scaling)

    # In place into two buffers: two passes per model instead of four.
    mixed = torch.zeros_like(base)
    scratch = torch.empty_like(base)
    for index, model in enumerate(models):
        torch.sub(model.float(), base, out=scratch)
        mixed.add_(apply_mask(scratch, masks[index], scales[index]), alpha=weights[index])
    if normalize:
        mixed /= weight_sum_divisor(weights)
    if scaling != 1.0:
        mixed *= scaling
    return mixed.add_(base)


def weight_sum_divisor(weights: Sequence[float]) -> float:
    """Return the sum of the weights, or 1 where it is within WEIGHT_SUM_EPSILON of zero."""
    divisor = float(sum(weights))
    if abs(divisor) < WEIGHT_SUM_EPSILON:
        return 1.0
    return divisor
