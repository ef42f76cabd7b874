"""Interface between the merge engine and the per-tensor merge kernels.

A merge method receives, for one output tensor, the base tensor (or None), the
tensors of the other models in input order, and parameters already resolved for
that tensor (per-model filters and layer gradients applied by the engine). All
input tensors are float32 on the compute device; the method returns float32 and
the engine casts to the output dtype. A method may instead return `out_dtype`
directly when it rounds as that cast would (the fused TIES and task arithmetic
kernels do for bf16).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch


@dataclass(frozen=True)
class ParameterSpec:
    """A parameter a method accepts, with its default (None: required).

    A flag (`is_flag`) is a boolean passed as 0.0 (off) or 1.0 (on), because
    `TensorMergeInput` carries numbers only. `minimum` and `maximum` bound the
    accepted values (inclusive) where the method needs a range.
    """

    name: str
    default: float | None
    per_model: bool
    description: str
    is_flag: bool = False
    minimum: float | None = None
    maximum: float | None = None


@dataclass(frozen=True)
class TensorMergeInput:
    """Everything a method needs to merge one tensor."""

    name: str
    base: torch.Tensor | None
    models: list[torch.Tensor]
    model_parameters: list[dict[str, float]] = field(default_factory=list)
    parameters: dict[str, float] = field(default_factory=dict)
    seed: int = 0
    out_dtype: torch.dtype | None = None


class MergeMethod(Protocol):
    """A merge method as the engine and the CLI see it.

    `description` states in one or two sentences what the method computes and
    how it treats the base model. `elementwise` is true when each output entry
    depends only on the same entry of the inputs (and the parameters), so the engine
    may merge a large tensor in row blocks with the same result.
    `stored_dtype_inputs` is true when `merge` accepts floating inputs in their stored
    dtype (bf16, say) and converts them to float32 block by block itself. The engine
    then passes them as read instead of making a float32 copy of each whole input.

    `checks_finite` is true when `merge` raises `NonFiniteInputError` for an input with
    a NaN or Inf entry. The engine then skips its own check of every input, a pass over
    memory that the fused kernels make as part of their work.
    """

    name: str
    requires_base: bool
    elementwise: bool
    stored_dtype_inputs: bool
    checks_finite: bool
    parameters: tuple[ParameterSpec, ...]
    description: str

    def merge(self, inputs: TensorMergeInput) -> torch.Tensor:
        """Merge one tensor; the result and the inputs are float32 (see `stored_dtype_inputs`)."""
        ...
