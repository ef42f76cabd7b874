"""Checks shared by every kernel: base presence, matching shapes, float32 inputs."""

from __future__ import annotations

import torch

from mergekit_ext.errors import IncompatibleModelsError, RecipeError
from mergekit_ext.methods.base import TensorMergeInput


def require_base(method_name: str, inputs: TensorMergeInput) -> torch.Tensor:
    """Return the base tensor in float32, or raise `RecipeError` when it is missing."""
    return stored_base(method_name, inputs).float()


def stored_base(method_name: str, inputs: TensorMergeInput) -> torch.Tensor:
    """Return the base tensor as given, or raise `RecipeError` when it is missing."""
    if inputs.base is None:
        raise RecipeError(
            f"merge method {method_name!r} needs a base model (tensor {inputs.name}). "
            f"Set base_model in the recipe"
        )
    return inputs.base


def check_shapes(inputs: TensorMergeInput, include_base: bool = True) -> None:
    """Raise `IncompatibleModelsError` when two input tensors differ in shape."""
    labelled: list[tuple[str, torch.Tensor]] = []
    if include_base and inputs.base is not None:
        labelled.append(("base model", inputs.base))
    labelled.extend((f"model {index}", tensor) for index, tensor in enumerate(inputs.models))
    if not labelled:
        return

    reference_label, reference = labelled[0]
    for label, tensor in labelled[1:]:
        if tensor.shape != reference.shape:
            raise IncompatibleModelsError(
                f"tensor {inputs.name} has shape {tuple(reference.shape)} in the "
                f"{reference_label} but {tuple(tensor.shape)} in {label}. Merge only "
                f"models of the same architecture, or align the vocabulary first"
            )


def task_vectors(base: torch.Tensor, inputs: TensorMergeInput) -> list[torch.Tensor]:
    """Return the task vectors (model minus base) in float32, in input order."""
    return [model.float() - base for model in inputs.models]


def mean_task_vector(deltas: list[torch.Tensor]) -> torch.Tensor:
    """Return the entry-wise mean of task vectors, summed one at a time."""
    total = torch.zeros_like(deltas[0])
    for delta in deltas:
        total += delta
    return total / len(deltas)
