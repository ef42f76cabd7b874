"""TIES sign election: the sign of the weighted sum of task vectors, 0 counted as +.

Everything here uses float operations only (signs and 0/1 factors instead of boolean
masks and `where`). On the development CPU a float operation ran at 7-10 G entries/s,
a comparison writing a boolean tensor at 2.3 G entries/s and `where` at 0.45 G
entries/s.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def elected_sign(weighted_sum: torch.Tensor) -> torch.Tensor:
    """Return +1 where the weighted sum of task vectors is >= 0 (-0.0 included) and -1 elsewhere."""
    return torch.sign(weighted_sum).neg_().relu_().mul_(-2.0).add_(1.0)


def agreement_mask(weighted_delta: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """Return 1.0 where an entry's sign equals the elected sign and 0.0 elsewhere (zero entries never agree)."""
    return torch.sign(weighted_delta).mul_(sign).relu_()


def consensus_merge(
    base: torch.Tensor,
    weighted: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    normalize: bool,
    scaling: float,
) -> torch.Tensor:
    """Return base + scaling * the sum of the weighted task vector entries that agree with the elected sign.

    With `normalize` the sum is divided by the weights of the agreeing entries (by 1
    where none agrees). The terms are added in model order, as in the whole-tensor
    formula, so block-wise use gives the same result to the bit. The `weighted`
    tensors are overwritten.
    """
    total = torch.zeros_like(base)
    for term in weighted:
        total += term
    sign = elected_sign(total)
    mixed = torch.zeros_like(base)
    divisor = torch.zeros_like(base)
    for term, weight in zip(weighted, weights):
        agrees = agreement_mask(term, sign)
        mixed += term.mul_(agrees)
        divisor.add_(agrees, alpha=weight)
    if normalize:
        # No agreeing entry: divide by 1 instead of 0.
        mixed /= divisor.add_(torch.sign(divisor).abs_().neg_().add_(1.0))
    if scaling != 1.0:
        mixed *= scaling
    return mixed.add_(base)
