"""DARE: drop task-vector entries at random, rescale kept ones to the original L1 norm."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mergekit_ext.methods.base import ParameterSpec, TensorMergeInput
from mergekit_ext.methods.combine import merge_task_vectors
from mergekit_ext.methods.inputs import check_shapes, require_base
from mergekit_ext.methods.parameters import (
    DENSITY,
    INT8_MASK,
    LAMBDA,
    WEIGHT,
    normalize_spec,
    rescale_spec,
    resolve_parameters,
)
from mergekit_ext.methods.sparsify import bernoulli_mask, l1_rescale_factor, tensor_generator

# Parameters shared by both DARE variants. mergekit 0.1.5 turns normalize off for both.
_DARE_PARAMETERS: tuple[ParameterSpec, ...] = (
    WEIGHT,
    DENSITY,
    LAMBDA,
    normalize_spec(False),
    rescale_spec(True),
    INT8_MASK,
)


def dare_masks(
    inputs: TensorMergeInput,
    base: torch.Tensor,
    densities: list[float],
    rescale: bool,
) -> tuple[list[torch.Tensor | None], list[torch.Tensor | None]]:
    """Draw one Bernoulli keep mask per model and its L1 rescale factor.

    All masks of a tensor come from one generator seeded by (seed, tensor name).
    They are drawn in model order, and a model with density 1 draws nothing.
    """
    generator = tensor_generator(inputs.seed, inputs.name)
    masks: list[torch.Tensor | None] = []
    scales: list[torch.Tensor | None] = []
    for model, density in zip(inputs.models, densities):
        mask = bernoulli_mask(base.shape, density, generator, base.device)
        masks.append(mask)
        if rescale and mask is not None:
            scales.append(l1_rescale_factor(model.float() - base, mask))
        else:
            scales.append(None)
    return masks, scales


@dataclass(frozen=True)
class DareMethod:
    """DARE (Yu et al., 2024), combined linearly or with TIES sign consensus."""

    name: str
    sign_consensus: bool
    description: str
    requires_base: bool = True
    elementwise: bool = False
    stored_dtype_inputs: bool = False
    checks_finite: bool = False
    parameters: tuple[ParameterSpec, ...] = _DARE_PARAMETERS

    def merge(self, inputs: TensorMergeInput) -> torch.Tensor:
        """Merge one tensor with random dropping, then a sum or sign consensus."""
        base = require_base(self.name, inputs)
        check_shapes(inputs)
        resolved = resolve_parameters(self.name, self.parameters, inputs)
        masks, scales = dare_masks(
            inputs, base, resolved.model_values("density"), resolved.flag("rescale")
        )
        return merge_task_vectors(
            base,
            inputs.models,
            resolved.model_values("weight"),
            masks,
            scales,
            sign_consensus=self.sign_consensus,
            normalize=resolved.flag("normalize"),
            scaling=resolved.shared["lambda"],
        )


DARE_TIES = DareMethod(
    name="dare_ties",
    sign_consensus=True,
    description=(
        "Per model keep each entry of x_i - base with probability density and "
        "rescale to the original L1 norm, then TIES sign consensus; normalize is off "
        "by default as in mergekit 0.1.5."
    ),
)
DARE_LINEAR = DareMethod(
    name="dare_linear",
    sign_consensus=False,
    description=(
        "Per model keep each entry of x_i - base with probability density and "
        "rescale to the original L1 norm, then base + lambda * sum of weighted task "
        "vectors (normalize off by default)."
    ),
)
