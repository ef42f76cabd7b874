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
        stored = stored_base(self.name, inputs)
        base = stored.reshape(-1)
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
        return merged.reshape(stored.shape)


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

    The weighted task vectors of the block are kept, so the election and the
    agreement pass read them instead of recomputing them. Terms are added in model
    order as in the whole-tensor formula, so the result is the same to the bit. Only
    float operations are used (signs and 0/1 factors instead of boolean masks and
    `where`). On the development CPU a float operation ran at 7-10 G entries/s, a
    comparison writing a boolean tensor at 2.3 G entries/s and `where` at 0.45 G
    entries/s.
    """
    total = torch.zeros_like(base)
    weighted_vectors = []
    for task_vector in task_vectors:
        delta = task_vector.model[part].float() - base
        if task_vector.cut is not None:
            delta = task_vector.cut.select(delta, part.start)
        if task_vector.scale is not None:
            delta = delta * task_vector.scale
        weighted = delta.mul_(task_vector.weight)
        total += weighted
        weighted_vectors.append(weighted)
    # The elected sign, +1 or -1 (a zero sum counts as +).
    elected = torch.sign(total).neg_().relu_().mul_(-2.0).add_(1.0)
    mixed = torch.zeros_like(base)
    divisor = torch.zeros_like(base)
    for task_vector, weighted in zip(task_vectors, weighted_vectors):
        # 1 where the entry's sign agrees with the elected one, 0 elsewhere (zeros never agree).
        agrees = torch.sign(weighted).mul_(elected).relu_()
        mixed += weighted.mul_(agrees)
        divisor.add_(agrees, alpha=task_vector.weight)
    if normalize:
        # No agreeing entry: divide by 1 instead of 0.
        mixed /= divisor.add_(torch.sign(divisor).abs_().neg_().add_(1.0))
    if scaling != 1.0:
        mixed *= scaling
    return mixed.add_(base)
