"""Iso-C and Iso-CTS: merged task vectors with a flat (isotropic) singular spectrum.

Marczak et al., "No Task Left Behind: Isotropic Model Merging with Common and
Task-Specific Subspaces", ICML 2025. Iso-C flattens the spectrum of the summed
task vectors. Iso-CTS keeps the top singular directions of the sum as a common
subspace, fills the remaining rank with each task's top directions outside it,
orthogonalizes the joint bases, and flattens the spectrum.
"""

from __future__ import annotations

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
from mergekit_ext.methods.svd import polar_factor
from mergekit_ext.methods.tsv import ALPHA

COMMON_SPACE_FRACTION = ParameterSpec(
    "common_space_fraction",
    0.8,
    per_model=False,
    description="Iso-CTS: fraction of the rank given to the common subspace",
    minimum=0.0,
    maximum=1.0,
)


def sum_task_vectors(deltas: list[torch.Tensor]) -> torch.Tensor:
    """Return the sum of task vectors, added one at a time."""
    total = torch.zeros_like(deltas[0])
    for delta in deltas:
        total += delta
    return total


def iso_c_merge(deltas: list[torch.Tensor]) -> torch.Tensor:
    """Return U (mean sigma) V^T of the summed 2-D task vectors, keeping its singular vectors."""
    u, s, vh = torch.linalg.svd(sum_task_vectors(deltas), full_matrices=False)
    return s.mean() * (u @ vh)


def iso_cts_ranks(rank: int, task_count: int, common_fraction: float) -> tuple[int, int]:
    """Return (common subspace rank, per-task rank) for a matrix of rank min(m, n).

    The common rank starts at int(fraction * rank). It then moves so that the rest
    splits evenly into task_count parts (Python round, half to even), as the Iso-CTS
    authors' code does. It stays int(fraction * rank) when the rest already splits
    evenly.
    """
    common = int(rank * common_fraction)
    task_total = round((rank - common) / task_count) * task_count
    if task_total > rank:
        # Rounding up can overshoot for small fractions, and the authors' code would
        # then slice with a negative common rank.
        task_total -= task_count
    common = rank - task_total
    return common, task_total // task_count


def iso_cts_merge(deltas: list[torch.Tensor], common_fraction: float) -> torch.Tensor:
    """Return the Iso-CTS merged task vector of 2-D task vectors."""
    rank = min(deltas[0].shape)
    common_rank, task_rank = iso_cts_ranks(rank, len(deltas), common_fraction)

    u, s, vh = torch.linalg.svd(sum_task_vectors(deltas), full_matrices=False)
    common_u = u[:, :common_rank]
    bases_u = []
    sigmas = []
    bases_vh = []
    if task_rank > 0:
        for delta in deltas:
            # Remove the common subspace from the left before taking task directions.
            specific = delta - common_u @ (common_u.T @ delta)
            task_u, task_s, task_vh = torch.linalg.svd(specific, full_matrices=False)
            bases_u.append(task_u[:, :task_rank])
            sigmas.append(task_s[:task_rank])
            bases_vh.append(task_vh[:task_rank, :])
    bases_u.append(common_u)
    sigmas.append(s[:common_rank])
    bases_vh.append(vh[:common_rank, :])

    joint_u = polar_factor(torch.cat(bases_u, dim=1))
    joint_v = polar_factor(torch.cat(bases_vh, dim=0).T)
    mean_sigma = torch.cat(sigmas).mean()
    return mean_sigma * (joint_u @ joint_v.T)


@dataclass(frozen=True)
class IsoCMethod:
    """Iso-C merge of task vectors, which needs a base model."""

    name: str = "iso_c"
    requires_base: bool = True
    elementwise: bool = False
    stored_dtype_inputs: bool = False
    checks_finite: bool = False
    parameters: tuple[ParameterSpec, ...] = (ALPHA,)
    description: str = (
        "Iso-C: for 2-D tensors, base + alpha * U (mean sigma) V^T of the summed task "
        "vectors. Other tensors get base + alpha * mean task vector."
    )

    def merge(self, inputs: TensorMergeInput) -> torch.Tensor:
        """Merge one tensor with Iso-C."""
        base = require_base(self.name, inputs)
        check_shapes(inputs)
        alpha = resolve_parameters(self.name, self.parameters, inputs).shared["alpha"]
        if not inputs.models:
            return base.clone()

        deltas = task_vectors(base, inputs)
        merged = iso_c_merge(deltas) if base.ndim == 2 else mean_task_vector(deltas)
        return base + alpha * merged


@dataclass(frozen=True)
class IsoCtsMethod:
    """Iso-CTS merge of task vectors, which needs a base model."""

    name: str = "iso_cts"
    requires_base: bool = True
    elementwise: bool = False
    stored_dtype_inputs: bool = False
    checks_finite: bool = False
    parameters: tuple[ParameterSpec, ...] = (ALPHA, COMMON_SPACE_FRACTION)
    description: str = (
        "Iso-CTS: for 2-D tensors, a common subspace of the summed task vectors plus "
        "each task's top directions outside it, with orthogonalized bases and the "
        "mean singular value; base + alpha * that. Other tensors get base + alpha * "
        "mean task vector."
    )

    def merge(self, inputs: TensorMergeInput) -> torch.Tensor:
        """Merge one tensor with Iso-CTS."""
        base = require_base(self.name, inputs)
        check_shapes(inputs)
        resolved = resolve_parameters(self.name, self.parameters, inputs)
        alpha = resolved.shared["alpha"]
        if not inputs.models:
            return base.clone()

        deltas = task_vectors(base, inputs)
        if base.ndim == 2:
            merged = iso_cts_merge(deltas, resolved.shared["common_space_fraction"])
        else:
            merged = mean_task_vector(deltas)
        return base + alpha * merged
