"""Per-task factors of a MASS artifact, and the merged weights θ_Ω of any task subset.

θ_Ω = θ_base + TSV-M over the tasks in Ω (uniform, α = 1) for 2-D tensors, and
θ_base + the mean of the Ω tasks' task vectors for other tensors. The artifact stores
the shared model θ_MT rather than θ_base, so θ_base is recovered once at load time as
θ_MT − (the shared model's own merged task vector).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from mergekit_ext.checkpoint import Checkpoint
from mergekit_ext.errors import CheckpointError
from mergekit_ext.mass.config import MassConfig, factor_file
from mergekit_ext.mass.subspace import LowRankFactors, tsv_merge

logger = logging.getLogger(__name__)

TaskSet = tuple[int, ...]


@dataclass
class TaskFactors:
    """One task's stored changes: low-rank factors of 2-D tensors and whole task vectors of others."""

    low_rank: dict[str, LowRankFactors] = field(default_factory=dict)
    deltas: dict[str, torch.Tensor] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path, device: torch.device) -> TaskFactors:
        if not path.is_file():
            raise CheckpointError(f"MASS factor file {path} is missing; rebuild the artifact with: merge mass")
        factors = cls()
        parts: dict[str, dict[str, torch.Tensor]] = {}
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            for key in handle.keys():
                name, part = key.rsplit(".", 1)
                parts.setdefault(name, {})[part] = handle.get_tensor(key).to(device=device, dtype=torch.float32)
        for name, tensors in parts.items():
            if "delta" in tensors:
                factors.deltas[name] = tensors["delta"]
            else:
                factors.low_rank[name] = LowRankFactors(tensors["u"], tensors["s"], tensors["vh"])
        return factors


class TaskStore:
    """Base weights and task factors; merges θ_Ω for any task set."""

    def __init__(self, base: dict[str, torch.Tensor], tasks: Sequence[TaskFactors]) -> None:
        self.base = base
        self.tasks = list(tasks)

    @property
    def changed_names(self) -> list[str]:
        """Names of the tensors that some task changes (the only ones θ_Ω replaces)."""
        return list(self.base)

    def merge(self, task_set: TaskSet) -> dict[str, torch.Tensor]:
        """Return θ_Ω (float32) for every changed tensor; unchanged tensors equal the shared model."""
        merged: dict[str, torch.Tensor] = {}
        for name, base_tensor in self.base.items():
            merged[name] = base_tensor + self.task_vector(name, task_set)
        return merged

    def task_vector(self, name: str, task_set: TaskSet) -> torch.Tensor:
        """Return the merged task vector of one tensor over `task_set` (α = 1)."""
        first = self.tasks[task_set[0]]
        if name in first.low_rank:
            return tsv_merge([self.tasks[i].low_rank[name] for i in task_set])
        return torch.stack([self.tasks[i].deltas[name] for i in task_set]).mean(dim=0)

    @classmethod
    def load(cls, folder: Path, config: MassConfig, device: torch.device) -> TaskStore:
        """Load every task's factors and recover θ_base from the shared model."""
        tasks = [TaskFactors.load(folder / factor_file(i), device) for i in range(len(config.task_names))]
        names = list(tasks[0].low_rank) + list(tasks[0].deltas)
        for index, task in enumerate(tasks[1:], start=1):
            if set(task.low_rank) | set(task.deltas) != set(names):
                raise CheckpointError(
                    f"{folder / factor_file(index)} and {folder / factor_file(0)} store different tensors; "
                    "rebuild the artifact with: merge mass"
                )

        shared = Checkpoint.open(folder)
        all_tasks = tuple(range(len(tasks)))
        store = cls({}, tasks)
        for name in names:
            subset = tuple(config.shared_task_subsets.get(name, all_tasks))
            shared_tensor = shared.load(name).to(device=device, dtype=torch.float32)
            store.base[name] = shared_tensor - config.alpha * store.task_vector(name, subset)
        shared.close()
        return store


class MergedModelCache:
    """LRU cache of merged weights θ_Ω keyed by the sorted task set."""

    def __init__(self, store: TaskStore, capacity: int = 8, dtype_of: dict[str, torch.dtype] | None = None) -> None:
        if capacity < 1:
            raise ValueError(f"cache capacity {capacity} is invalid; it must be at least 1")
        self.store = store
        self.capacity = capacity
        self.dtype_of = dtype_of or {}
        self.entries: OrderedDict[TaskSet, dict[str, torch.Tensor]] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get(self, task_set: TaskSet) -> dict[str, torch.Tensor]:
        """Return θ_Ω for `task_set`, merging it on a miss and evicting the least recently used entry."""
        key = tuple(sorted(task_set))
        if key in self.entries:
            self.hits += 1
            self.entries.move_to_end(key)
            return self.entries[key]
        self.misses += 1
        merged = self.store.merge(key)
        weights = {name: tensor.to(self.dtype_of.get(name, tensor.dtype)) for name, tensor in merged.items()}
        self.entries[key] = weights
        if len(self.entries) > self.capacity:
            evicted, _ = self.entries.popitem(last=False)
            logger.debug("Evicted merged model of tasks %s from the cache", evicted)
        return weights

    def __contains__(self, task_set: TaskSet) -> bool:
        return tuple(sorted(task_set)) in self.entries

    def __len__(self) -> int:
        return len(self.entries)
