"""Aggregation of per-pair activation differences into one steering direction."""

from __future__ import annotations

import torch

from mergekit_ext.errors import RecipeError

METHODS = ("mean_difference", "pca", "median", "trimmed_mean")


def aggregate_differences(positive: torch.Tensor, negative: torch.Tensor, method: str = "mean_difference", trim: float = 0.1) -> torch.Tensor:
    """Combine activations of shape (pairs, hidden) into one direction.

    - `mean_difference`: mean(positive) - mean(negative), not normalized.
    - `pca`: first principal direction of the per-pair differences (uncentered),
      scaled to the mean projection of the differences and signed so that most
      differences project positively.
    - `median`: coordinate-wise median of the differences (the lower middle value
      for an even count, as `torch.median` returns).
    - `trimmed_mean`: coordinate-wise mean after dropping the `trim` fraction of the
      largest and of the smallest values.
    """
    if positive.shape != negative.shape or positive.ndim != 2:
        raise RecipeError(f"activation shapes differ: {tuple(positive.shape)} and {tuple(negative.shape)}")
    differences = (positive - negative).double()
    if method == "mean_difference":
        # Mean of the differences equals the difference of the means for paired rows.
        return differences.mean(dim=0).float()
    if method == "pca":
        _, _, right = torch.linalg.svd(differences, full_matrices=False)
        direction = right[0]
        projections = differences @ direction
        # SVD fixes a direction only up to sign, so flip it to agree with most pairs.
        if (projections > 0).sum() * 2 < len(projections):
            direction = -direction
            projections = -projections
        return (direction * projections.mean()).float()
    if method == "median":
        return differences.median(dim=0).values.float()
    if method == "trimmed_mean":
        if not 0.0 <= trim < 0.5:
            raise RecipeError(f"trim fraction {trim} must be in [0, 0.5)")
        count = differences.shape[0]
        cut = int(count * trim)
        ordered = differences.sort(dim=0).values
        return ordered[cut : count - cut].mean(dim=0).float()
    raise RecipeError(f"unknown aggregation method {method!r}; choose one of {', '.join(METHODS)}")
