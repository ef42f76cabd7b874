"""Resolution of a method's declared parameters for one tensor.

The engine passes numbers only, so boolean parameters arrive as 0.0 (off) or
1.0 (on). A per-model parameter is looked up in that model's dictionary first,
then in the shared dictionary (as mergekit's global `parameters:` section works),
then falls back to its default.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from mergekit_ext.errors import RecipeError
from mergekit_ext.methods.base import ParameterSpec, TensorMergeInput


@dataclass(frozen=True)
class ResolvedParameters:
    """Parameter values for one tensor: shared ones and one dictionary per model."""

    shared: dict[str, float]
    per_model: list[dict[str, float]]

    def flag(self, name: str) -> bool:
        """Return a shared boolean parameter (stored as 0.0 or 1.0) as a bool."""
        return self.shared[name] != 0.0

    def model_values(self, name: str) -> list[float]:
        """Return a per-model parameter in the order of the input models."""
        return [values[name] for values in self.per_model]


def resolve_parameters(
    method_name: str, specs: tuple[ParameterSpec, ...], inputs: TensorMergeInput
) -> ResolvedParameters:
    """Fill defaults and reject unknown, missing or non-finite parameters."""
    by_name = {spec.name: spec for spec in specs}
    valid_names = ", ".join(sorted(by_name)) or "none"
    model_count = len(inputs.models)

    if inputs.model_parameters and len(inputs.model_parameters) != model_count:
        raise ValueError(
            f"tensor {inputs.name}: {len(inputs.model_parameters)} per-model parameter "
            f"dictionaries for {model_count} models"
        )

    for name in inputs.parameters:
        if name not in by_name:
            raise RecipeError(
                f"merge method {method_name!r} has no parameter {name!r} (tensor "
                f"{inputs.name}). Valid parameters: {valid_names}"
            )
    for index, values in enumerate(inputs.model_parameters):
        for name in values:
            spec = by_name.get(name)
            if spec is None:
                raise RecipeError(
                    f"merge method {method_name!r} has no parameter {name!r} (model "
                    f"{index}, tensor {inputs.name}). Valid parameters: {valid_names}"
                )
            if not spec.per_model:
                raise RecipeError(
                    f"parameter {name!r} of merge method {method_name!r} applies to "
                    f"the whole merge, not to model {index}. Move it to the global "
                    f"parameters of the recipe"
                )

    shared = {
        spec.name: _lookup(method_name, spec, inputs, model_index=None)
        for spec in specs
        if not spec.per_model
    }
    per_model = [
        {
            spec.name: _lookup(method_name, spec, inputs, model_index=index)
            for spec in specs
            if spec.per_model
        }
        for index in range(model_count)
    ]
    return ResolvedParameters(shared=shared, per_model=per_model)


def _lookup(
    method_name: str,
    spec: ParameterSpec,
    inputs: TensorMergeInput,
    model_index: int | None,
) -> float:
    where = f"tensor {inputs.name}" if model_index is None else (
        f"model {model_index}, tensor {inputs.name}"
    )
    value: float | None = None
    if model_index is not None and inputs.model_parameters:
        value = inputs.model_parameters[model_index].get(spec.name)
    if value is None:
        value = inputs.parameters.get(spec.name)
    if value is None:
        value = spec.default
    if value is None:
        raise RecipeError(
            f"merge method {method_name!r} requires parameter {spec.name!r} ({where}). "
            f"Set it in the recipe"
        )

    return checked_value(method_name, spec, value, where)


def checked_value(method_name: str, spec: ParameterSpec, value: Any, where: str) -> float:
    """Return `value` as a float, or raise `RecipeError` when it is not finite, not a flag or out of range."""
    value = float(value)
    prefix = f"parameter {spec.name!r} of merge method {method_name!r} is {value} ({where})"
    if not math.isfinite(value):
        raise RecipeError(f"{prefix}. Use a finite number")
    if spec.is_flag and value not in (0.0, 1.0):
        raise RecipeError(f"{prefix}. Pass a boolean as 0 (off) or 1 (on)")
    if spec.minimum is not None and value < spec.minimum:
        raise RecipeError(f"{prefix}. Use a value of at least {spec.minimum}")
    if spec.maximum is not None and value > spec.maximum:
        raise RecipeError(f"{prefix}. Use a value of at most {spec.maximum}")
    return value


# Parameters of the task-vector methods, named and defaulted as in mergekit 0.1.5,
# except that `weight` defaults to 1.0 where mergekit requires it.
WEIGHT = ParameterSpec(
    "weight", 1.0, per_model=True, description="coefficient of this model's contribution"
)
DENSITY = ParameterSpec(
    "density",
    1.0,
    per_model=True,
    description="fraction of task-vector entries kept (1 keeps all)",
    minimum=0.0,
    maximum=1.0,
)
LAMBDA = ParameterSpec(
    "lambda", 1.0, per_model=False, description="scale of the merged task vector"
)
INT8_MASK = ParameterSpec(
    "int8_mask",
    0.0,
    per_model=False,
    description="flag accepted so mergekit recipes run unchanged (mergekit uses it "
    "to save memory); it changes no result",
    is_flag=True,
)


def normalize_spec(default: bool) -> ParameterSpec:
    """Return the `normalize` flag with a method-specific default."""
    return ParameterSpec(
        "normalize",
        1.0 if default else 0.0,
        per_model=False,
        description="flag: divide the merged task vector by the sum of weights",
        is_flag=True,
    )


def rescale_spec(default: bool) -> ParameterSpec:
    """Return the `rescale` flag with a method-specific default."""
    return ParameterSpec(
        "rescale",
        1.0 if default else 0.0,
        per_model=False,
        description="flag: rescale each sparsified task vector to its original L1 norm",
        is_flag=True,
    )
