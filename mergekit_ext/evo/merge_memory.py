"""Merge a genome into a resident model, and the equivalent recipe for the streaming engine.

Both paths call the same kernels (`mergekit_ext.methods.get_method`) with the
same per-tensor parameters and DARE seed, so a merge in memory equals the
exported checkpoint up to the output dtype's rounding.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from mergekit_ext.checkpoint import Checkpoint
from mergekit_ext.errors import IncompatibleModelsError
from mergekit_ext.evo.genome import Genome, SearchSpace
from mergekit_ext.methods import get_method
from mergekit_ext.methods.base import TensorMergeInput
from mergekit_ext.recipe import Condition, ModelEntry, Recipe, layer_index

logger = logging.getLogger(__name__)


def count_layers(names: list[str]) -> int:
    indices = [layer_index(name) for name in names]
    found = [index for index in indices if index is not None]
    return max(found) + 1 if found else 0


class ResidentSources:
    """Base and source tensors held in memory (on `device`, in `dtype`) for repeated merges."""

    def __init__(self, space: SearchSpace, device: torch.device, dtype: torch.dtype = torch.float32) -> None:
        started = time.perf_counter()
        base = Checkpoint.open(space.base_model)
        sources = [Checkpoint.open(path) for path in space.models]
        self.names = list(base.names)
        for path, checkpoint in zip(space.models, sources):
            missing = [name for name in self.names if name not in checkpoint]
            if missing:
                raise IncompatibleModelsError(
                    f"Model {path} lacks {len(missing)} tensors of the base {space.base_model}, "
                    f"first {missing[0]}; use models of the same architecture."
                )
        self.num_layers = count_layers(self.names)
        self.base = {name: base.load(name).to(device=device, dtype=dtype) for name in self.names}
        self.sources = [
            {name: checkpoint.load(name).to(device=device, dtype=dtype) for name in self.names} for checkpoint in sources
        ]
        for name in self.names:
            for path, source in zip(space.models, self.sources):
                if source[name].shape != self.base[name].shape:
                    raise IncompatibleModelsError(
                        f"Tensor {name} has shape {tuple(source[name].shape)} in {path} but "
                        f"{tuple(self.base[name].shape)} in the base; use models of the same architecture."
                    )
        logger.info(
            "Loaded base and %d source models (%d tensors) in %.1f s",
            len(sources), len(self.names), time.perf_counter() - started,
        )


def merge_tensor(genome: Genome, name: str, base: torch.Tensor, sources: list[torch.Tensor], num_layers: int) -> torch.Tensor:
    """Merge one tensor for a genome with the shared kernels; float32 in and out."""
    space = genome.space
    weights = genome.weights_for(name, num_layers)
    densities = genome.densities()
    if space.method == "linear":
        base_weight = max(0.0, 1.0 - sum(weights))
        inputs = TensorMergeInput(
            name=name,
            base=None,
            models=[base, *sources],
            model_parameters=[{"weight": base_weight}] + [{"weight": w} for w in weights],
            parameters={"normalize": 1.0},
            seed=space.merge_seed,
        )
    else:
        per_model = [{"weight": w} for w in weights]
        if space.method in ("ties", "dare_ties"):
            per_model = [{"weight": w, "density": d} for w, d in zip(weights, densities)]
        inputs = TensorMergeInput(
            name=name, base=base, models=list(sources), model_parameters=per_model, parameters={}, seed=space.merge_seed
        )
    return get_method(space.method).merge(inputs)


@torch.inference_mode()
def write_genome_into(model: torch.nn.Module, genome: Genome, resident: ResidentSources) -> None:
    """Overwrite the model's parameters with the merge of `genome` (float32 math, model dtype out)."""
    state = model.state_dict()
    for name in resident.names:
        if name not in state:
            raise IncompatibleModelsError(f"Tensor {name} of the checkpoint has no parameter in the loaded model.")
        merged = merge_tensor(
            genome,
            name,
            resident.base[name].float(),
            [source[name].float() for source in resident.sources],
            resident.num_layers,
        )
        state[name].copy_(merged.to(state[name].dtype))


def genome_recipe(genome: Genome, num_layers: int, dtype: str | None = None) -> Recipe:
    """Return the merge recipe that the streaming engine runs to export a genome."""
    space = genome.space
    weight_values = [_weight_parameter(genome, index, num_layers) for index in range(len(space.models))]
    densities = genome.densities()
    entries: list[ModelEntry] = []
    if space.method == "linear":
        entries.append(ModelEntry(model=str(space.base_model), parameters={"weight": _linear_base_weight(genome, num_layers)}))
    for index, path in enumerate(space.models):
        parameters: dict = {"weight": weight_values[index]}
        if space.method in ("ties", "dare_ties"):
            parameters["density"] = densities[index]
        entries.append(ModelEntry(model=str(path), parameters=parameters))
    return Recipe(
        merge_method=space.method,
        base_model=None if space.method == "linear" else str(space.base_model),
        models=entries,
        parameters={"normalize": True} if space.method == "linear" else {},
        dtype=dtype,
    )


def _linear_base_weight(genome: Genome, num_layers: int) -> float | list[Condition]:
    """Return the base's weight in a linear genome: 1 minus the sources' weights, at least 0.

    It is computed per layer group as `merge_tensor` computes it per tensor, summing
    in the same order, so the exported checkpoint equals the in-memory merge exactly.
    """
    table = genome.weight_table()

    def remainder(column: int) -> float:
        return max(0.0, 1.0 - sum(float(table[index, column]) for index in range(len(genome.space.models))))

    if genome.space.weights == "global":
        return remainder(0)
    conditions = [
        Condition(filter=f"layers.{layer}.", value=remainder(genome.group_of(f"layers.{layer}.x", num_layers)))
        for layer in range(num_layers)
    ]
    conditions.append(Condition(filter=None, value=remainder(table.shape[1] - 1)))
    return conditions


def _weight_parameter(genome: Genome, index: int, num_layers: int) -> float | list[Condition]:
    table = genome.weight_table()
    if genome.space.weights == "global":
        return float(table[index, 0])
    conditions = [
        Condition(filter=f"layers.{layer}.", value=float(table[index, genome.group_of(f"layers.{layer}.x", num_layers)]))
        for layer in range(num_layers)
    ]
    conditions.append(Condition(filter=None, value=float(table[index, -1])))
    return conditions


def checkpoint_layers(path: str | Path) -> int:
    return count_layers(list(Checkpoint.open(path).names))
