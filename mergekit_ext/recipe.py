"""Merge recipes: a YAML schema compatible with mergekit's, and parameter resolution.

A recipe names a method, a base model, the models with per-model parameters, and
global parameters. A parameter value is a scalar, a gradient (a list of numbers
interpolated over the layers), or a list of `{filter, value}` conditions. In a
condition list the first condition whose filter is a substring of the tensor name
wins. A condition without a filter, or with `*`, matches every tensor.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from mergekit_ext.errors import RecipeError

Scalar = Union[float, int, bool]
ParameterValue = Union[Scalar, list[Any]]

# Layer index inside a tensor name: "model.layers.3.", "h.3.", "resblocks.3.", "encoder.layer.3.".
LAYER_PATTERN = re.compile(r"(?:^|\.)(?:layers|layer|h|resblocks|blocks)\.(\d+)\.")


class Condition(BaseModel):
    """A parameter value that applies to tensors whose name contains `filter`."""

    model_config = ConfigDict(extra="forbid")

    filter: str | None = None
    value: ParameterValue


class ModelEntry(BaseModel):
    """One input model of a recipe and its per-model parameters."""

    model_config = ConfigDict(extra="forbid")

    model: str
    parameters: dict[str, ParameterValue | list[Condition]] = Field(default_factory=dict)


class Recipe(BaseModel):
    """A merge recipe, validated when loaded (a subset of mergekit's schema)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    merge_method: str
    base_model: str | None = None
    models: list[ModelEntry] = Field(default_factory=list)
    parameters: dict[str, ParameterValue | list[Condition]] = Field(default_factory=dict)
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_source: str | None = None
    name: str | None = None

    @field_validator("merge_method")
    @classmethod
    def _normalize_method(cls, value: str) -> str:
        return value.strip().lower().replace("-", "_")

    def model_paths(self) -> list[str]:
        """Paths of the non-base models, in input order (the base is dropped if listed)."""
        return [entry.model for entry in self.models if entry.model != self.base_model]

    def to_yaml(self) -> str:
        """Serialize the recipe as YAML (the form written next to merged outputs)."""
        data = self.model_dump(exclude_none=True)
        for entry in data.get("models", []):
            if not entry.get("parameters"):
                entry.pop("parameters", None)
        if not data.get("parameters"):
            data.pop("parameters", None)
        return yaml.safe_dump(data, sort_keys=False)


def load_recipe(path: str | Path) -> Recipe:
    """Load and validate a YAML recipe; errors name the offending key."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise RecipeError(f"{path}: recipe file not found") from None
    except yaml.YAMLError as error:
        raise RecipeError(f"{path}: invalid YAML: {error}") from error
    return parse_recipe(data, source=str(path))


def parse_recipe(data: Any, source: str = "recipe") -> Recipe:
    """Validate a recipe given as a mapping."""
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: a recipe must be a YAML mapping with at least 'merge_method'")
    if "slices" in data:
        raise RecipeError(
            f"{source}: 'slices' recipes are not supported; list the inputs under 'models' "
            "and use layer gradients for per-layer values"
        )
    try:
        return Recipe.model_validate(data)
    except ValidationError as error:
        raise RecipeError(f"{source}: {_describe(error)}") from error


def _describe(error: ValidationError) -> str:
    problems = []
    for item in error.errors()[:3]:
        key = ".".join(str(part) for part in item["loc"])
        if item["type"] == "extra_forbidden":
            problems.append(f"unknown key '{key}'")
        elif item["type"] == "missing":
            problems.append(f"missing key '{key}'")
        else:
            problems.append(f"invalid value at '{key}': {item['msg']}")
    return "; ".join(problems)


def layer_index(tensor_name: str) -> int | None:
    """Return the block index parsed from a tensor name, or None for non-layer tensors."""
    match = LAYER_PATTERN.search(tensor_name)
    return int(match.group(1)) if match else None


def layer_position(tensor_name: str, num_layers: int) -> float:
    """Return t in [0, 1] for gradients: layer/(L-1); 0 for non-layer tensors, 1 when L = 1."""
    index = layer_index(tensor_name)
    if index is None:
        return 0.0
    if num_layers <= 1:
        return 1.0
    return index / (num_layers - 1)


def resolve_value(value: Any, tensor_name: str, t: float, key: str = "parameter") -> float | None:
    """Resolve a scalar, gradient or filter list for one tensor (None when no filter matches)."""
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, Condition):
        value = [value]
    if isinstance(value, list):
        if not value:
            raise RecipeError(f"invalid value at '{key}': an empty list")
        if all(isinstance(item, (int, float)) and not isinstance(item, bool) for item in value):
            return _interpolate([float(item) for item in value], t)
        for item in value:
            condition = item if isinstance(item, Condition) else _as_condition(item, key)
            if condition.filter in (None, "*") or condition.filter in tensor_name:
                return resolve_value(condition.value, tensor_name, t, key)
        return None
    raise RecipeError(f"invalid value at '{key}': {value!r} is not a number, list or filter list")


def _as_condition(item: Any, key: str) -> Condition:
    if isinstance(item, dict):
        try:
            return Condition.model_validate(item)
        except ValidationError as error:
            raise RecipeError(f"invalid filter entry at '{key}': {item!r}") from error
    raise RecipeError(f"invalid value at '{key}': mixes numbers and filter entries ({item!r})")


def _interpolate(values: list[float], t: float) -> float:
    # A gradient of n values places them evenly over [0, 1]: s = t(n-1), linear in between.
    scaled = t * (len(values) - 1)
    lower = int(scaled)
    upper = min(len(values) - 1, lower + 1)
    fraction = scaled - lower
    return (1 - fraction) * values[lower] + fraction * values[upper]
