"""TIES: keep the top-density |task vector| entries, elect signs, average agreeing entries."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mergekit_ext.methods.base import ParameterSpec, TensorMergeInput
from mergekit_ext.methods.inputs import check_shapes, stored_base
from mergekit_ext.methods.parameters import (
    DENSITY,
    INT8_MASK,
    LAMBDA,
    WEIGHT,
    normalize_spec,
    rescale_spec,
    resolve_parameters,
)
from mergekit_ext.methods.sparsify import (
    MagnitudeCut,
    TaskVectorMagnitudes,
    apply_mask,
    block_slices,
    cut_l1_rescale_factor,
    magnitude_cut,
)


@dataclass(frozen=True)
class TiesMethod:
    """TIES-Merging (Yadav et al., 2023) with mergekit 0.1.5 defaults."""

    name: str = "ties"
    requires_base: bool = True
    elementwise: bool = False
    stored_dtype_inputs: bool = True
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
        """Merge one tensor with magnitude trimming and sign consensus.

        Inputs may be in their stored dtype: the work runs over blocks converted to
        float32 one at a time, so no float32 copy of a whole input is ever made.
        """
        base = stored_base(self.name, inputs).reshape(-1)
        check_shapes(inputs)
        resolved = resolve_parameters(self.name, self.parameters, inputs)
        task_vectors = []
        for model, weight, density in zip(
            inputs.models, resolved.model_values("weight"), resolved.model_values("density")
        ):
            task_vector = _selected_task_vector(model.reshape(-1), base, weight, density, resolved.flag("rescale"))
            if task_vector is not None:
                task_vectors.append(task_vector)
        merged = torch.empty(base.numel(), dtype=torch.float32, device=base.device)
        for part in block_slices(base.numel()):
            merged[part] = _consensus_block(
                base[part].float(), task_vectors, part, resolved.flag("normalize"), resolved.shared["lambda"]
            )
        return merged.reshape(inputs.base.shape if inputs.base is not None else base.shape)


@dataclass
class _SelectedTaskVector:
    """A model's trimmed task vector, read block by block: its input, weight, cut and rescale factor."""

    model: torch.Tensor
    weight: float
    cut: MagnitudeCut | None
    scale: torch.Tensor | None


def _selected_task_vector(
    model: torch.Tensor, base: torch.Tensor, weight: float, density: float, rescale: bool
) -> _SelectedTaskVector | None:
    """Find the magnitude cut of one model, or None when its task vector is all zero."""
    magnitudes = TaskVectorMagnitudes(model, base)
    cut = magnitude_cut(magnitudes, density)
    if cut is not None and float(cut.value) == 0.0:
        if cut.above == 0:
            # The model leaves this tensor unchanged (a frozen embedding, say): its
            # zero task vector adds nothing whatever the mask, so skip it.
            return None
        # Kept zeros add nothing, so keeping only the entries above zero is the same.
        cut = MagnitudeCut(cut.value, cut.above, 0)
    scale = cut_l1_rescale_factor(magnitudes, cut) if rescale and cut is not None else None
    return _SelectedTaskVector(model, weight, cut, scale)


def _consensus_block(
    base: torch.Tensor,
    task_vectors: list[_SelectedTaskVector],
    part: slice,
    normalize: bool,
    scaling: float,
) -> torch.Tensor:
    """Merge one block: elect the sign of the weighted sum, average the agreeing entries.

    The sums of positive and negative weighted entries, and of the weights behind
    them, are kept apart, so one pass over the models serves both possible signs.
    They add the same terms in the same order as summing the agreeing entries after
    the election would, so the result is the same to the bit. Only float operations
    are used (signs and 0/1 factors instead of boolean masks and `where`). On the
    development CPU a float operation ran at 7-10 G entries/s, a comparison writing a
    boolean tensor at 2.3 G entries/s and `where` at 0.45 G entries/s.
    """
    total = torch.zeros_like(base)
    positive = torch.zeros_like(base)
    negative = torch.zeros_like(base)
    positive_weight = torch.zeros_like(base)
    negative_weight = torch.zeros_like(base)
    for task_vector in task_vectors:
        delta = task_vector.model[part].float() - base
        if task_vector.cut is not None:
            delta = task_vector.cut.select(delta, part.start)
        if task_vector.scale is not None:
            delta = delta * task_vector.scale
        weighted = delta.mul_(task_vector.weight)
        total += weighted
        positive += weighted.clamp(min=0)
        negative += weighted.clamp(max=0)
        signs = torch.sign(weighted)
        positive_weight.add_(signs.clamp(min=0), alpha=task_vector.weight)
        negative_weight.add_(signs.clamp(max=0), alpha=-task_vector.weight)
    # 1 where the elected sign is + (a zero sum counts as +), else 0.
    elected = torch.sign(total).neg_().relu_().neg_().add_(1.0)
    rejected = torch.sub(1.0, elected)
    mixed = positive.mul_(elected).add_(negative.mul_(rejected))
    if normalize:
        divisor = positive_weight.mul_(elected).add_(negative_weight.mul_(rejected))
        # No agreeing entry: divide by 1 instead of 0.
        mixed /= divisor.add_(torch.sign(divisor).abs_().neg_().add_(1.0))
    if scaling != 1.0:
        mixed *= scaling
    return mixed.add_(base)
