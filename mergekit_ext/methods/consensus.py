"""TIES sign election: the sign of the weighted sum of task vectors, 0 counted as +."""

from __future__ import annotations

import torch


def elected_sign(weighted_sum: torch.Tensor) -> torch.Tensor:
    """Return +1 where the weighted sum of task vectors is >= 0 and -1 elsewhere."""
    return torch.where(weighted_sum >= 0, 1.0, -1.0).to(weighted_sum.dtype)


def agreement_mask(weighted_delta: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """Keep entries whose sign equals the elected sign; zero entries are never kept."""
    return torch.sign(weighted_delta) == sign
