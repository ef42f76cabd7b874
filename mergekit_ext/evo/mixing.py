"""A model whose batch rows each run their own linear merge of the same sources.

Every linear layer, embedding and RMSNorm of the base model is replaced by a
module holding the base weights A and the task vectors D_j = X_j - A. For row r
with coefficients c_rj (one set per weight group of the genome):

- linear:    y_r = x_r A^T + sum_j c_rj x_r D_j^T (biases likewise)
- embedding: e_r = A[ids_r] + sum_j c_rj D_j[ids_r]
- RMSNorm:   the weight of row r is A + sum_j c_rj D_j, computed in float32 and
             cast to the model dtype as the sequential merge does.

In float32 this equals decoding each merged model separately, up to summation
order. In bfloat16 the linear layers round x D^T separately, so greedy tokens
can differ (`merge evo agreement` measures how often).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from mergekit_ext.checkpoint import Checkpoint
from mergekit_ext.errors import IncompatibleModelsError, RecipeError
from mergekit_ext.evo.genome import Genome, SearchSpace, group_of_layer
from mergekit_ext.evo.merge_memory import count_layers
from mergekit_ext.recipe import layer_index

logger = logging.getLogger(__name__)


class RowCoefficients:
    """Coefficients of the current batch: shape (rows, groups, sources), float32."""

    def __init__(self) -> None:
        self.rows: torch.Tensor | None = None

    def column(self, group: int, source: int, dtype: torch.dtype) -> torch.Tensor:
        if self.rows is None:
            raise RuntimeError("Row coefficients are unset; call MixingModel.set_rows before a forward pass.")
        return self.rows[:, group, source].to(dtype)


def _broadcast(coefficient: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return coefficient.view(-1, *([1] * (like.dim() - 1)))


class MixingLinear(nn.Module):
    def __init__(self, base: nn.Linear, deltas: list[tuple[torch.Tensor, torch.Tensor | None]], group: int,
                 state: RowCoefficients) -> None:
        super().__init__()
        self.weight = base.weight
        self.bias = base.bias
        self.delta_weights = [weight for weight, _ in deltas]
        self.delta_biases = [bias for _, bias in deltas]
        self.group = group
        self.state = state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        output = F.linear(x, self.weight, self.bias)
        for source, (weight, bias) in enumerate(zip(self.delta_weights, self.delta_biases)):
            coefficient = _broadcast(self.state.column(self.group, source, output.dtype), output)
            output = output + coefficient * F.linear(x, weight, bias)
        return output


class MixingEmbedding(nn.Module):
    def __init__(self, base: nn.Embedding, deltas: list[torch.Tensor], group: int, state: RowCoefficients) -> None:
        super().__init__()
        self.weight = base.weight
        self.padding_idx = base.padding_idx
        self.delta_weights = deltas
        self.group = group
        self.state = state

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        output = F.embedding(ids, self.weight, self.padding_idx)
        for source, weight in enumerate(self.delta_weights):
            coefficient = _broadcast(self.state.column(self.group, source, output.dtype), output)
            output = output + coefficient * F.embedding(ids, weight, self.padding_idx)
        return output


class MixingRMSNorm(nn.Module):
    def __init__(self, base: nn.Module, base_weight: torch.Tensor, deltas: list[torch.Tensor], group: int,
                 state: RowCoefficients) -> None:
        super().__init__()
        self.weight = base.weight
        self.variance_epsilon = getattr(base, "variance_epsilon", getattr(base, "eps", 1e-6))
        self.base_weight = base_weight  # float32
        self.delta_weights = deltas  # float32
        self.group = group
        self.state = state

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        states = hidden_states.to(torch.float32)
        variance = states.pow(2).mean(-1, keepdim=True)
        states = states * torch.rsqrt(variance + self.variance_epsilon)
        row_weight = self.base_weight.unsqueeze(0)
        for source, weight in enumerate(self.delta_weights):
            coefficient = self.state.column(self.group, source, torch.float32).view(-1, 1)
            row_weight = row_weight + coefficient * weight.unsqueeze(0)
        # Cast the merged weight to the model dtype first, as writing merged weights into a model does.
        row_weight = row_weight.to(self.weight.dtype).unsqueeze(1)
        return row_weight * states.to(input_dtype)


class MixingModel:
    """The base model with every weight-bearing module replaced by its mixing version."""

    def __init__(self, space: SearchSpace, device: torch.device, dtype: torch.dtype) -> None:
        from mergekit_ext.evo.backends import load_model

        self.space = space
        self.state = RowCoefficients()
        self.model = load_model(space.base_model, device, dtype)
        base = Checkpoint.open(space.base_model)
        sources = [Checkpoint.open(path) for path in space.models]
        self.num_layers = count_layers(list(base.names))
        self._replace_modules(base, sources, device, dtype)

    def _group(self, module_name: str) -> int:
        if self.space.weights == "global":
            return 0
        layer = layer_index(module_name + ".")
        if layer is None:
            return self.space.layer_groups
        return group_of_layer(layer, self.num_layers, self.space.layer_groups)

    def _checkpoint_names(self) -> dict[int, str]:
        # Tied weights (lm_head sharing embed_tokens) appear once in the checkpoint; map storage to name.
        names: dict[int, str] = {}
        for name, parameter in self.model.named_parameters(remove_duplicate=False):
            names.setdefault(parameter.data_ptr(), name)
        return names

    def _delta(self, name: str, base: Checkpoint, sources: list[Checkpoint], device, dtype) -> list[torch.Tensor]:
        if name not in base:
            raise IncompatibleModelsError(f"Tensor {name} of the loaded model is not in {self.space.base_model}.")
        reference = base.load(name).to(device=device, dtype=torch.float32)
        deltas = []
        for path, source in zip(self.space.models, sources):
            if name not in source:
                raise IncompatibleModelsError(f"Tensor {name} is missing from {path}; use models of one architecture.")
            deltas.append((source.load(name).to(device=device, dtype=torch.float32) - reference).to(dtype))
        return deltas

    def _replace_modules(self, base: Checkpoint, sources: list[Checkpoint], device, dtype) -> None:
        storage_names = self._checkpoint_names()
        replaced: set[str] = set()
        replacements: list[tuple[str, nn.Module]] = []
        for module_name, module in self.model.named_modules():
            group = self._group(module_name)
            if isinstance(module, nn.Linear):
                weight_name = storage_names[module.weight.data_ptr()]
                weights = self._delta(weight_name, base, sources, device, dtype)
                biases: list[torch.Tensor | None] = [None] * len(weights)
                if module.bias is not None:
                    biases = self._delta(f"{module_name}.bias", base, sources, device, dtype)
                    replaced.add(f"{module_name}.bias")
                replaced.add(weight_name)
                replacements.append((module_name, MixingLinear(module, list(zip(weights, biases)), group, self.state)))
            elif isinstance(module, nn.Embedding):
                weight_name = storage_names[module.weight.data_ptr()]
                replaced.add(weight_name)
                deltas = self._delta(weight_name, base, sources, device, dtype)
                replacements.append((module_name, MixingEmbedding(module, deltas, group, self.state)))
            elif type(module).__name__.endswith("RMSNorm"):
                weight_name = f"{module_name}.weight"
                replaced.add(weight_name)
                deltas = self._delta(weight_name, base, sources, device, torch.float32)
                base_weight = base.load(weight_name).to(device=device, dtype=torch.float32)
                replacements.append((module_name, MixingRMSNorm(module, base_weight, deltas, group, self.state)))
        for module_name, replacement in replacements:
            parent_name, _, child = module_name.rpartition(".")
            parent = self.model.get_submodule(parent_name) if parent_name else self.model
            setattr(parent, child, replacement)
        uncovered = [name for name in base.names if name not in replaced]
        if uncovered:
            raise RecipeError(
                f"The population backend cannot mix tensor {uncovered[0]} ({len(uncovered)} such tensors): only "
                "linear, embedding and RMSNorm weights are supported. Use backend: sequential."
            )
        logger.info("Population backend: %d modules mix %d source models", len(replacements), len(sources))

    def coefficients(self, genome: Genome) -> torch.Tensor:
        """Return the (groups, sources) coefficient table of a genome, float32."""
        table = genome.weight_table()  # (sources, groups)
        columns = []
        for group in range(table.shape[1]):
            columns.append(genome.linear_coefficients([float(w) for w in table[:, group]]))
        return torch.tensor(columns, dtype=torch.float32)

    def set_rows(self, rows: torch.Tensor) -> None:
        device = next(self.model.parameters()).device
        self.state.rows = rows.to(device)
