"""SLERP: spherical interpolation from the base (t = 0) to one other model (t = 1)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mergekit_ext.errors import RecipeError
from mergekit_ext.methods.base import ParameterSpec, TensorMergeInput
from mergekit_ext.methods.inputs import check_shapes, require_base
from mergekit_ext.methods.parameters import resolve_parameters

# Above this |cos| the two tensors are treated as collinear and interpolated linearly.
DOT_THRESHOLD = 0.9995
# Norms at or below this are replaced by 1 when normalizing the flattened tensors.
NORM_EPSILON = 1e-8


def slerp(t: float, start: torch.Tensor, end: torch.Tensor) -> torch.Tensor:
    """Interpolate along the great circle between the flattened tensors.

    The angle comes from the normalized tensors, but the coefficients apply to the
    raw tensors, as in mergekit 0.1.5. t = 0 returns start exactly.
    """
    if t == 0.0:
        return start.float().clone()
    a = start.float().reshape(-1)
    b = end.float().reshape(-1)
    if a.numel() == 0:
        return ((1 - t) * a + t * b).reshape(start.shape)

    norm_a = torch.linalg.vector_norm(a)
    norm_b = torch.linalg.vector_norm(b)
    norm_a = torch.where(norm_a > NORM_EPSILON, norm_a, 1.0)
    norm_b = torch.where(norm_b > NORM_EPSILON, norm_b, 1.0)
    dot = torch.dot(a / norm_a, b / norm_b).clamp(-1.0, 1.0)

    if dot.abs() > DOT_THRESHOLD:
        result = (1 - t) * a + t * b
    else:
        theta = torch.acos(dot)
        sin_theta = torch.sin(theta)
        coefficient_a = torch.sin((1 - t) * theta) / sin_theta
        coefficient_b = torch.sin(t * theta) / sin_theta
        result = coefficient_a * a + coefficient_b * b
    return result.reshape(start.shape)


@dataclass(frozen=True)
class SlerpMethod:
    """SLERP between the base model and exactly one other model."""

    name: str = "slerp"
    requires_base: bool = True
    elementwise: bool = False
    stored_dtype_inputs: bool = False
    checks_finite: bool = False
    parameters: tuple[ParameterSpec, ...] = (
        ParameterSpec(
            "t",
            None,
            per_model=False,
            description="interpolation factor: 0 returns the base, 1 the other model",
        ),
    )
    description: str = (
        "Spherical interpolation of the flattened tensors from the base (t = 0) to "
        "the one other model (t = 1); linear when |cos| > 0.9995."
    )

    def merge(self, inputs: TensorMergeInput) -> torch.Tensor:
        """Merge one tensor by spherical interpolation."""
        base = require_base(self.name, inputs)
        if len(inputs.models) != 1:
            raise RecipeError(
                f"merge method 'slerp' needs exactly one model besides the base, got "
                f"{len(inputs.models)} (tensor {inputs.name}). List one model"
            )
        check_shapes(inputs)
        resolved = resolve_parameters(self.name, self.parameters, inputs)
        return slerp(resolved.shared["t"], base, inputs.models[0])
