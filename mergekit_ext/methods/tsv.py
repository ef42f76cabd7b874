"""TSV-M: keep each task's top singular vectors, orthogonalize the joint bases, keep sigmas."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from mergekit_ext.methods.base import ParameterSpec, TensorMergeInput
from mergekit_ext.methods.inputs import (
    check_shapes,
    mean_task_vector,
    require_base,
    task_vectors,
)
from mergekit_ext.methods.parameters import resolve_parameters
from mergekit_ext.methods.svd import polar_factor, truncated_svd

logger = logging.getLogger(__name__)

ALPHA = ParameterSpec(
    "alpha", 1.0, per_model=False, description="scale of the merged task vector"
)


def tsv_rank(shape: torch.Size, task_count: int) -> int:
    """Return the per-task rank k = floor(min(m, n) / T) of a 2-D tensor."""
    return min(shape[0], shape[1]) // task_count


def tsv_merge_factors(
    us: Sequence[torch.Tensor], ss: Sequence[torch.Tensor], vhs: Sequence[torch.Tensor]
) -> torch.Tensor:
    """Return U_perp diag(s) V_perp^T from per-task factors, with the sigmas unscaled.

    U_perp and V_perp are the polar factors of the concatenated per-task bases
    [u_1 ... u_T] and [vh_1^T ... vh_T^T] (Gargiulo et al., "Task Singular
    Vectors: Reducing Task Interference in Model Merging", CVPR 2025).
    """
    u_joint = polar_factor(torch.cat(list(us), dim=1))
    v_joint = polar_factor(torch.cat([vh.T for vh in vhs], dim=1))
    sigma = torch.cat(list(ss))
    return (u_joint * sigma) @ v_joint.T


def tsv_merge_deltas(deltas: Sequence[torch.Tensor], rank: int | None = None) -> torch.Tensor:
    """Return the TSV-M merged task vector of 2-D task vectors, each truncated to rank.

    rank defaults to floor(min(m, n) / T). Task vectors that are all zero (a tensor the
    task left unchanged) are left out of the concatenation: their arbitrary singular
    bases would rotate the other tasks' bases. The rank still counts every task.
    """
    if rank is None:
        rank = tsv_rank(deltas[0].shape, len(deltas))
    changed = [delta for delta in deltas if bool(torch.any(delta != 0))]
    if not changed:
        return torch.zeros_like(deltas[0], dtype=torch.float32)
    factors = [truncated_svd(delta, rank) for delta in changed]
    return tsv_merge_factors(
        [u for u, _, _ in factors], [s for _, s, _ in factors], [vh for _, _, vh in factors]
    )


@dataclass(frozen=True)
class TsvMethod:
    """TSV-M merge of task vectors, which needs a base model."""

    name: str = "tsv"
    requires_base: bool = True
    elementwise: bool = False
    stored_dtype_inputs: bool = False
    checks_finite: bool = False
    parameters: tuple[ParameterSpec, ...] = (ALPHA,)
    description: str = (
        "TSV-M: for 2-D tensors, each task keeps its top floor(min(m, n) / T) singular "
        "components, the concatenated bases are replaced by their polar factors, and "
        "base + alpha * U diag(sigma) V^T is returned. Other tensors, and 2-D tensors "
        "with fewer rows or columns than tasks, get base + alpha * mean task vector."
    )

    def merge(self, inputs: TensorMergeInput) -> torch.Tensor:
        """Merge one tensor with TSV-M."""
        base = require_base(self.name, inputs)
        check_shapes(inputs)
        alpha = resolve_parameters(self.name, self.parameters, inputs).shared["alpha"]
        if not inputs.models:
            return base.clone()

        deltas = task_vectors(base, inputs)
        if base.ndim == 2 and tsv_rank(base.shape, len(deltas)) > 0:
            merged = tsv_merge_deltas(deltas)
        else:
            if base.ndim == 2:
                # NOTE: with k = 0, TSV-M would drop the tensor's update entirely, so the
                # mean task vector is used instead.
                logger.debug(
                    "tensor %s: %d tasks exceed min(%d, %d), using the mean task vector",
                    inputs.name, len(deltas), base.shape[0], base.shape[1],
                )
            merged = mean_task_vector(deltas)
        return base + alpha * merged
