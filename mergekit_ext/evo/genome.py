"""Search space and genome decoding for evolutionary merging.

A genome is a vector of genes in [lower, upper]. Per source model it holds
either one global weight, or one weight per contiguous layer group plus one for
the tensors outside the layers (embeddings, final norm, lm_head). With density
genes on (TIES and DARE-TIES only) one density per source model follows.

Methods and the merged tensor, with base tensor b, source tensors x_j, task
vectors d_j = x_j - b and per-tensor weights w_j:

- task_arithmetic: b + sum_j w_j d_j (one source: (1 - w) b + w x).
- linear: weighted average of the base (weight max(0, 1 - sum w)) and the
  sources (weights w_j), normalized; equal to b + sum_j w_j d_j / max(1, sum w).
- ties / dare_ties: the kernels of `mergekit_ext.methods` with weight w_j and
  density (a gene or `density`). With one source and normalization on, the
  TIES weight cancels out; only density matters.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from mergekit_ext.errors import RecipeError
from mergekit_ext.recipe import layer_index

MethodName = Literal["task_arithmetic", "ties", "dare_ties", "linear"]
LINEAR_METHODS = ("task_arithmetic", "linear")


class SearchSpace(BaseModel):
    """What the search varies: models, method and the genes."""

    model_config = ConfigDict(extra="forbid")

    base_model: str
    models: list[str] = Field(min_length=1)
    method: MethodName = "task_arithmetic"
    weights: Literal["global", "layer_groups"] = "global"
    layer_groups: int = Field(1, ge=1)
    density_genes: bool = False
    # Density of every source when density_genes is off (ties and dare_ties only).
    density: float = Field(1.0, gt=0.0, le=1.0)
    weight_bounds: tuple[float, float] = (0.0, 1.0)
    density_bounds: tuple[float, float] = (0.1, 1.0)
    # Seed of the DARE random masks, per (seed, tensor name) as in the merge engine.
    merge_seed: int = 0

    @model_validator(mode="after")
    def _check(self) -> SearchSpace:
        if self.density_genes and self.method not in ("ties", "dare_ties"):
            raise RecipeError(
                f"density_genes needs method ties or dare_ties, not {self.method}; set density_genes: false."
            )
        for name, (lower, upper) in (("weight_bounds", self.weight_bounds), ("density_bounds", self.density_bounds)):
            if not lower < upper:
                raise RecipeError(f"{name} must be [lower, upper] with lower < upper, got {[lower, upper]}.")
        if self.density_genes and not (0.0 < self.density_bounds[0] and self.density_bounds[1] <= 1.0):
            raise RecipeError(f"density_bounds must lie in (0, 1], got {list(self.density_bounds)}.")
        return self

    @property
    def weights_per_model(self) -> int:
        return 1 if self.weights == "global" else self.layer_groups + 1

    @property
    def num_genes(self) -> int:
        return len(self.models) * (self.weights_per_model + (1 if self.density_genes else 0))

    def gene_names(self) -> list[str]:
        names = []
        for index in range(len(self.models)):
            if self.weights == "global":
                names.append(f"weight[{index}]")
            else:
                names.extend(f"weight[{index}].group{group}" for group in range(self.layer_groups))
                names.append(f"weight[{index}].other")
        if self.density_genes:
            names.extend(f"density[{index}]" for index in range(len(self.models)))
        return names

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """Return lower and upper bounds per gene."""
        weight_count = len(self.models) * self.weights_per_model
        density_count = self.num_genes - weight_count
        lower = np.array([self.weight_bounds[0]] * weight_count + [self.density_bounds[0]] * density_count)
        upper = np.array([self.weight_bounds[1]] * weight_count + [self.density_bounds[1]] * density_count)
        return lower, upper

    def is_linear(self) -> bool:
        """True when every merged tensor is linear in the sources (the population backend's condition)."""
        return self.method in LINEAR_METHODS

    def decode(self, genes: np.ndarray | list[float]) -> Genome:
        values = np.asarray(genes, dtype=np.float64).reshape(-1)
        if values.size != self.num_genes:
            raise RecipeError(f"Genome has {values.size} genes; the search space needs {self.num_genes}.")
        return Genome(space=self, genes=tuple(round(float(v), 12) for v in values))


@dataclass(frozen=True)
class Genome:
    """One decoded candidate: per-source weights per group and densities."""

    space: SearchSpace
    genes: tuple[float, ...]

    def key(self) -> str:
        """Stable identity for memoization and deduplication (genes rounded to 1e-9)."""
        return ",".join(f"{gene:.9f}" for gene in self.genes)

    def weight_table(self) -> np.ndarray:
        """Return weights as (sources, groups); groups = layer groups then `other` (or one column)."""
        count = len(self.space.models) * self.space.weights_per_model
        return np.array(self.genes[:count]).reshape(len(self.space.models), self.space.weights_per_model)

    def densities(self) -> list[float]:
        if self.space.density_genes:
            count = len(self.space.models) * self.space.weights_per_model
            return list(self.genes[count:])
        return [self.space.density] * len(self.space.models)

    def group_of(self, tensor_name: str, num_layers: int) -> int:
        """Return the weight column of a tensor: its layer group, or the `other` column."""
        if self.space.weights == "global":
            return 0
        layer = layer_index(tensor_name)
        if layer is None:
            return self.space.layer_groups
        return group_of_layer(layer, num_layers, self.space.layer_groups)

    def weights_for(self, tensor_name: str, num_layers: int) -> list[float]:
        return [float(w) for w in self.weight_table()[:, self.group_of(tensor_name, num_layers)]]

    def linear_coefficients(self, weights: list[float]) -> list[float]:
        """Return c_j with merged = b + sum_j c_j d_j, for the linear methods only."""
        if self.space.method == "task_arithmetic":
            return list(weights)
        if self.space.method == "linear":
            scale = max(1.0, sum(weights))
            return [w / scale for w in weights]
        raise RecipeError(f"Method {self.space.method} is not linear in the task vectors.")


def group_of_layer(layer: int, num_layers: int, groups: int) -> int:
    """Return the contiguous group of a layer: layers split into `groups` near-equal runs."""
    return min(groups - 1, layer * groups // max(1, num_layers))
