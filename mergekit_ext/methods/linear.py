"""Linear merge: the weighted average of the listed models."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mergekit_ext.errors import RecipeError
from mergekit_ext.methods.base import ParameterSpec, TensorMergeInput
from mergekit_ext.methods.inputs import check_shapes
from mergekit_ext.methods.parameters import WEIGHT, normalize_spec, resolve_parameters


def linear_combination(
    tensors: list[torch.Tensor], weights: list[float], normalize: bool
) -> torch.Tensor:
    """Return sum(w_i * x_i), divided by sum(w_i) when normalizing, keeping every entry."""
    result = torch.zeros_like(tensors[0], dtype=torch.float32)
    for tensor, weight in zip(tensors, weights):
        result.add_(tensor.float(), alpha=weight)
    if normalize:
        result /= sum(weights)
    return result


@dataclass(frozen=True)
class LinearMethod:
    """Weighted average of `inputs.models`, in input order.

    As in mergekit 0.1.5, the base model takes part only when the recipe lists it
    among the models: the engine then passes it inside `inputs.models` with its
    weight, and `inputs.base` is ignored.
    """

    name: str = "linear"
    requires_base: bool = False
    elementwise: bool = True
    stored_dtype_inputs: bool = False
    checks_finite: bool = False
    parameters: tuple[ParameterSpec, ...] = (WEIGHT, normalize_spec(True))
    description: str = (
        "Weighted average sum(w_i x_i) / sum(w_i) of the listed models; the base "
        "model counts only if the recipe lists it among the models."
    )

    def merge(self, inputs: TensorMergeInput) -> torch.Tensor:
        """Merge one tensor as the weighted average of the listed models."""
        if not inputs.models:
            raise RecipeError(
                f"merge method 'linear' got no models for tensor {inputs.name}. "
                f"List at least one model"
            )
        check_shapes(inputs, include_base=False)
        resolved = resolve_parameters(self.name, self.parameters, inputs)
        weights = resolved.model_values("weight")
        normalize = resolved.flag("normalize")

        # mergekit 0.1.5 divides by a zero weight sum and returns inf/NaN.
        if normalize and sum(weights) == 0.0:
            raise RecipeError(
                f"the weights of merge method 'linear' sum to 0 for tensor "
                f"{inputs.name}, so they cannot be normalized. Change the weights "
                f"or set normalize to false"
            )
        return linear_combination(list(inputs.models), weights, normalize)
