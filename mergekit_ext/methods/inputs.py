"""Checks shared by every kernel: base presence, matching shapes, finite values, float32 inputs."""

from __future__ import annotations

import torch

from mergekit_ext.errors import IncompatibleModelsError, NonFiniteInputError, RecipeError, TaskVectorOverflowError
from mergekit_ext.methods import fused
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


def all_finite(tensor: torch.Tensor, *, load_kernels: bool = True) -> bool:
    """Return True when a floating-point tensor has no NaN or infinite entry.

    With `load_kernels` False, the fused kernels check only once something else has
    loaded them. Loading numba takes about 1 s, which would hold up a reader thread.
    """
    if tensor.numel() == 0:
        return True
    if tensor.is_contiguous() and (load_kernels or fused.loaded()) and fused.accepts([tensor.view(-1)]):
        return fused.all_finite(tensor.view(-1))
    # NaN propagates through min and max, and an Inf is the min or the max, so two
    # reductions decide it. This is one fast pass, while torch.isfinite would also write
    # a boolean tensor as large as the input.
    low, high = torch.aminmax(tensor)
    return bool(torch.isfinite(torch.stack([low, high])).all())


def check_finite(inputs: TensorMergeInput) -> None:
    """Raise `NonFiniteInputError` for the first input, the base and then the models, with a NaN or Inf entry."""
    if inputs.base is not None and not all_finite(inputs.base):
        raise NonFiniteInputError(inputs.name, None)
    for index, model in enumerate(inputs.models):
        if not all_finite(model):
            raise NonFiniteInputError(inputs.name, index)


def task_vectors(base: torch.Tensor, inputs: TensorMergeInput) -> list[torch.Tensor]:
    """Return the task vectors (model minus base) in float32, in input order.

    Raises `TaskVectorOverflowError` when one overflows float32, which the
    decompositions of the subspace merges cannot take.
    """
    deltas = [model.float() - base for model in inputs.models]
    for index, delta in enumerate(deltas):
        if not all_finite(delta):
            raise TaskVectorOverflowError(inputs.name, index)
    return deltas


def mean_task_vector(deltas: list[torch.Tensor]) -> torch.Tensor:
    """Return the entry-wise mean of task vectors, summed one at a time."""
    total = torch.zeros_like(deltas[0])
    for delta in deltas:
        total += delta
    return total / len(deltas)
