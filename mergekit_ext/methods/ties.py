"""TIES: keep the top-density |task vector| entries, elect signs, average agreeing entries."""

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
from mergekit_ext.methods.sparsify import l1_rescale_factor, top_magnitude_mask


@dataclass(frozen=True)
class TiesMethod:
    """TIES-Merging (Yadav et al., 2023) with mergekit 0.1.5 defaults."""

    name: str = "ties"
    requires_base: bool = True
    elementwise: bool = False
    parameters: tuple[ParameterSpec, ...] = (
        WEIGHT,
        DENSITY,
        LAMBDA,
        normalize_spec(True),
        rescale_spec(False),
        INT8_MASK,
    )
    description: str = (
        "Per model keep the int(density * numel) largest |x_i - base| entries, elect "
        "the sign of the weighted sum (0 counts as +), keep agreeing entries, divide "
        "by the sum of their weights (normalize, on by default), times lambda, plus base."
    )

    def merge(self, inputs: TensorMergeInput) -> torch.Tensor:
        """Merge one tensor with magnitude trimming and sign consensus."""
        base = require_base(self.name, inputs)
        check_shapes(inputs)
        resolved = resolve_parameters(self.name, self.parameters, inputs)
        rescale = resolved.flag("rescale")

        masks: list[torch.Tensor | None] = []
        scales: list[torch.Tensor | None] = []
        for model, density in zip(inputs.models, resolved.model_values("density")):
            # |x_i - base| in place: the L1 rescale needs only magnitudes too.
            magnitudes = torch.sub(model.float(), base).abs_()
            if not bool(magnitudes.any()):
                # The model leaves this tensor unchanged (a frozen embedding, say): its
                # zero task vector adds nothing whatever the mask, so skip the selection.
                masks.append(None)
                scales.append(None)
                continue
            mask = top_magnitude_mask(magnitudes, density)
            masks.append(mask)
            scales.append(l1_rescale_factor(magnitudes, mask) if rescale and mask is not None else None)
            del magnitudes

        return merge_task_vectors(
            base,
            inputs.models,
            resolved.model_values("weight"),
            masks,
            scales,
            sign_consensus=True,
            normalize=resolved.flag("normalize"),
            scaling=resolved.shared["lambda"],
        )
