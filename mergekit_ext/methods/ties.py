"""TIES: keep the top-density |task vector| entries, elect signs, average agreeing entries."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from mergekit_ext.errors import NonFiniteInputError
from mergekit_ext.methods import fused
from mergekit_ext.methods.base import ParameterSpec, TensorMergeInput
from mergekit_ext.methods.consensus import consensus_merge
from mergekit_ext.methods.inputs import all_finite, check_finite, check_shapes, stored_base
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
    NonFiniteMagnitudes,
    TaskVectorMagnitudes,
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
    checks_finite: bool = True
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
        float32 one at a time, so no float32 copy of a whole input is ever made. On
        CPU, with bf16 or float32 inputs, the fused kernels (`fused`) do the same work
        in one pass per model for the cut and one pass for the merge.
        """
        stored = stored_base(self.name, inputs)
        base = stored.reshape(-1)
        check_shapes(inputs)
        resolved = resolve_parameters(self.name, self.parameters, inputs)
        flat_models = [model.reshape(-1) for model in inputs.models]
        use_fused = fused.accepts([base, *flat_models])
        if not use_fused:
            check_finite(inputs)
        selections = [
            functools.partial(
                _selected_task_vector, inputs.name, index, model, base, weight, density, resolved.flag("rescale"), use_fused
            )
            for index, (model, weight, density) in enumerate(
                zip(flat_models, resolved.model_values("weight"), resolved.model_values("density"))
            )
        ]
        if use_fused and base.numel() >= fused.PARALLEL_MIN_ELEMENTS:
            # The fused kernels release the GIL, so the models' cuts are found side by side.
            found = fused.run_parallel(selections)
        else:
            found = [select() for select in selections]
        if use_fused and not any(base_checked for _, base_checked in found) and not all_finite(base):
            raise NonFiniteInputError(inputs.name, None)
        task_vectors = [task_vector for task_vector, _ in found if task_vector is not None]
        if use_fused:
            merged = _fused_consensus(
                base, task_vectors, resolved.flag("normalize"), resolved.shared["lambda"], inputs.out_dtype
            )
            return merged.reshape(stored.shape)
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
    name: str,
    index: int,
    model: torch.Tensor,
    base: torch.Tensor,
    weight: float,
    density: float,
    rescale: bool,
    check: bool,
) -> tuple[_SelectedTaskVector | None, bool]:
    """Find the magnitude cut of model `index`, or None when its task vector is all zero.

    With `check`, raises `NonFiniteInputError` for NaN or Inf in the model or the base.
    The fused selection pass checks both inputs as it reads them, and only a model
    that no such pass read gets a check of its own. The flag returned is True when
    the pass checked the base.
    """
    magnitudes = TaskVectorMagnitudes(model, base)
    try:
        cut = magnitude_cut(magnitudes, density)
    except NonFiniteMagnitudes as error:
        raise NonFiniteInputError(name, None if error.in_base else index) from None
    if check and not magnitudes.finite_checked and not all_finite(model):
        raise NonFiniteInputError(name, index)
    if cut is not None and float(cut.value) == 0.0:
        if cut.above == 0:
            # The model leaves this tensor unchanged (a frozen embedding, say): its
            # zero task vector adds nothing whatever the mask, so skip it.
            return None, magnitudes.finite_checked
        # Kept zeros add nothing, so keeping only the entries above zero is the same.
        cut = MagnitudeCut(cut.value, cut.above, 0)
    scale = cut_l1_rescale_factor(magnitudes, cut) if rescale and cut is not None else None
    return _SelectedTaskVector(model, weight, cut, scale), magnitudes.finite_checked


def _consensus_block(
    base: torch.Tensor,
    task_vectors: list[_SelectedTaskVector],
    part: slice,
    normalize: bool,
    scaling: float,
) -> torch.Tensor:
    """Merge one block: trim each task vector with its cut, then elect signs (`consensus_merge`)."""
    weighted = []
    for task_vector in task_vectors:
        delta = task_vector.model[part].float() - base
        if task_vector.cut is not None:
            delta = task_vector.cut.select(delta, part.start)
        if task_vector.scale is not None:
            delta = delta * task_vector.scale
        weighted.append(delta.mul_(task_vector.weight))
    weights = [task_vector.weight for task_vector in task_vectors]
    return consensus_merge(base, weighted, weights, normalize=normalize, scaling=scaling)


def _fused_consensus(
    base: torch.Tensor,
    task_vectors: list[_SelectedTaskVector],
    normalize: bool,
    scaling: float,
    out_dtype: torch.dtype | None,
) -> torch.Tensor:
    """Merge a whole flat tensor with the fused kernel: the same arithmetic as `_consensus_block`, in one pass."""
    rules = []
    for task_vector in task_vectors:
        if task_vector.cut is None:
            rules.append(fused.KeepRule.keep_all())
        else:
            threshold, tie_threshold = task_vector.cut.thresholds()
            rules.append(fused.KeepRule(threshold, tie_threshold, task_vector.cut.tie_end))
    return fused.consensus(
        base,
        [task_vector.model for task_vector in task_vectors],
        rules,
        [1.0 if task_vector.scale is None else float(task_vector.scale) for task_vector in task_vectors],
        [task_vector.weight for task_vector in task_vectors],
        normalize=normalize,
        scaling=scaling,
        out_dtype=out_dtype,
    )
