"""Removing the refusal direction (or a subspace) from a steering vector."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mergekit_ext.errors import RecipeError
from mergekit_ext.steer.model_access import check_direction_width
from mergekit_ext.steer.vector import SteeringVector, cosine


@dataclass(frozen=True)
class OrthogonalizationRow:
    """Effect of the projection at one layer; cosines are against -r (the first direction)."""

    layer: int
    cos_negative_refusal_before: float
    cos_negative_refusal_after: float
    cos_refusal_after: float
    norm_before: float
    norm_after: float

    @property
    def norm_change(self) -> float:
        """Relative change of the L2 norm, (after - before) / before."""
        return (self.norm_after - self.norm_before) / self.norm_before if self.norm_before else 0.0


def project_out(vector: torch.Tensor, directions: torch.Tensor) -> torch.Tensor:
    """Return v - Q Qᵀ v where Q is an orthonormal basis of the rows of `directions`.

    For one direction r this is v - (v·r̂) r̂ with no rescaling afterwards.
    """
    basis_rows = directions.double().reshape(-1, vector.shape[0])
    basis, _ = torch.linalg.qr(basis_rows.T)
    v = vector.double()
    return (v - basis @ (basis.T @ v)).to(vector.dtype)


def orthogonalize_vector(vector: SteeringVector, refusal: dict[int, torch.Tensor] | torch.Tensor) -> tuple[SteeringVector, list[OrthogonalizationRow]]:
    """Project each steered layer's direction off the refusal direction(s) of that layer.

    `refusal` is one tensor used at every layer, or {layer: tensor} with either a (hidden,)
    direction or a (k, hidden) stack spanning a subspace.
    """
    rows: list[OrthogonalizationRow] = []
    directions: dict[int, torch.Tensor] = {}
    for layer in vector.layers:
        against = refusal if isinstance(refusal, torch.Tensor) else refusal.get(layer)
        if against is None:
            raise RecipeError(f"no refusal direction for steered layer {layer}; give one for layers {vector.layers}")
        stack = against.reshape(-1, against.shape[-1]).float()
        for row in stack:
            check_direction_width(row, vector.width, f"refusal direction at layer {layer}")
        original = vector.directions[layer]
        projected = project_out(original, stack)
        directions[layer] = projected
        rows.append(
            OrthogonalizationRow(
                layer=layer,
                cos_negative_refusal_before=cosine(original, -stack[0]),
                cos_negative_refusal_after=cosine(projected, -stack[0]),
                cos_refusal_after=cosine(projected, stack[0]),
                norm_before=float(original.norm()),
                norm_after=float(projected.norm()),
            )
        )
    return vector.with_recipe(extra={**vector.recipe.extra, "orthogonalized": "refusal"}).with_directions(directions), rows
