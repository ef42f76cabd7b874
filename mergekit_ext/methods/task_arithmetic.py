"""Task arithmetic: base + lambda * sum of weighted task vectors, nothing dropped."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mergekit_ext.methods import fused
from mergekit_ext.methods.base import ParameterSpec, TensorMergeInput
from mergekit_ext.methods.combine import merge_task_vectors, weight_sum_divisor
from mergekit_ext.methods.inputs import check_finite, check_shapes, stored_base
from mergekit_ext.methods.parameters import (
    INT8_MASK,
    LAMBDA,
    WEIGHT,
    normalize_spec,
    resolve_parameters,
)


@dataclass(frozen=True)
class TaskArithmeticMethod:
    """Task arithmetic (Ilharco et al., 2023) with mergekit 0.1.5 defaults."""

    name: str = "task_arithmetic"
    requires_base: bool = True
    elementwise: bool = True
    # merge_task_vectors converts each 1M-entry block itself: measured on 2 cores, a
    # warm merge of 4 bf16 Qwen2-0.5B-shaped models took 4.3-4.8 s instead of 5.0-5.8 s.
    stored_dtype_inputs: bool = True
    checks_finite: bool = True
    parameters: tuple[ParameterSpec, ...] = (
        WEIGHT,
        LAMBDA,
        normalize_spec(False),
        INT8_MASK,
    )
    description: str = (
        "base + lambda * sum(w_i (x_i - base)), divided by sum(w_i) when normalize "
        "is on (off by default)."
    )

    def merge(self, inputs: TensorMergeInput) -> torch.Tensor:
        """Merge one tensor by adding the weighted task vectors to the base."""
        stored = stored_base(self.name, inputs)
        check_shapes(inputs)
        resolved = resolve_parameters(self.name, self.parameters, inputs)
        weights = resolved.model_values("weight")
        flat_models = [model.reshape(-1) for model in inputs.models]
        if flat_models and fused.accepts([stored.reshape(-1), *flat_models]):
            # The torch path's arithmetic in one pass (see `merge_task_vectors`).
            divisor = None
            if resolved.flag("normalize"):
                divisor = weight_sum_divisor(weights)
            merged, non_finite = fused.task_arithmetic(
                stored.reshape(-1),
                flat_models,
                weights,
                divisor=divisor,
                scaling=resolved.shared["lambda"],
                out_dtype=inputs.out_dtype,
            )
            if non_finite:
                # A NaN or Inf input makes its output entries non-finite, so only then are
                # the inputs checked. Finite inputs whose sum overflowed keep the result.
                check_finite(inputs)
            return merged.reshape(stored.shape)
        check_finite(inputs)
        base = stored.float()
        count = len(inputs.models)
        return merge_task_vectors(
            base,
            inputs.models,
            weights,
            masks=[None] * count,
            scales=[None] * count,
            sign_consensus=False,
            normalize=resolved.flag("normalize"),
            scaling=resolved.shared["lambda"],
        )
