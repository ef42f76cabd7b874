"""Steering vectors in memory and in `vector.safetensors` files."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mergekit_ext.errors import CheckpointError, InvalidTensorError, PickleNotAllowedError

LAYER_CONVENTION = "block_output: layer L is the output of decoder block L (hidden_states[L+1])"
_PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".pkl", ".pickle", ".ckpt")


@dataclass(frozen=True)
class SteeringRecipe:
    """Provenance and default application settings of a steering vector."""

    model: str = ""
    layer_convention: str = LAYER_CONVENTION
    position: str = "last"
    method: str = "mean_difference"
    template_prefix: str = ""
    template_suffix: str = ""
    template_hash: str = ""
    dataset_hash: str = ""
    num_pairs: int = 0
    alpha: float = 1.0
    protocol: str = "all-steps"
    trim: float = 0.1
    extra: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> SteeringRecipe:
        values = json.loads(text)
        known = {name: values[name] for name in cls.__dataclass_fields__ if name in values}
        return cls(**known)


@dataclass
class SteeringVector:
    """Directions per layer (float32, not normalized) and the recipe that made them."""

    directions: dict[int, torch.Tensor]
    recipe: SteeringRecipe = field(default_factory=SteeringRecipe)

    @property
    def layers(self) -> list[int]:
        return sorted(self.directions)

    @property
    def width(self) -> int:
        return int(next(iter(self.directions.values())).shape[0])

    def with_directions(self, directions: dict[int, torch.Tensor]) -> SteeringVector:
        return SteeringVector(directions=directions, recipe=self.recipe)

    def with_recipe(self, **changes: object) -> SteeringVector:
        return SteeringVector(directions=dict(self.directions), recipe=replace(self.recipe, **changes))  # type: ignore[arg-type]

    def save(self, path: str | Path) -> None:
        """Write `direction.<L>` tensors and the recipe as safetensors metadata."""
        tensors = {f"direction.{layer}": self.directions[layer].detach().float().contiguous().cpu() for layer in self.layers}
        save_file(tensors, str(path), metadata={"format": "pt", "recipe": self.recipe.to_json()})

    @classmethod
    def load(cls, path: str | Path, allow_pickle: bool = False) -> SteeringVector:
        """Read a vector from safetensors; pickled files only with `allow_pickle` and `weights_only=True`."""
        source = Path(path)
        if not source.is_file():
            raise CheckpointError(f"vector file {source} not found")
        if source.suffix.lower() in _PICKLE_SUFFIXES or _looks_pickled(source):
            return _load_pickled(source, allow_pickle)
        if source.suffix.lower() == ".gguf":
            from mergekit_ext.steer.gguf_io import import_gguf

            return import_gguf(source)
        try:
            with safe_open(str(source), framework="pt") as handle:
                metadata = handle.metadata() or {}
                directions = {_parse_layer(name, source): handle.get_tensor(name).float() for name in handle.keys()}
        except (OSError, ValueError, RuntimeError) as error:
            raise CheckpointError(f"{source} is not a readable safetensors file ({error})") from error
        if not directions:
            raise CheckpointError(f"{source} contains no direction.<L> tensor")
        recipe = SteeringRecipe.from_json(metadata["recipe"]) if "recipe" in metadata else SteeringRecipe()
        return cls(directions=directions, recipe=recipe)


def _parse_layer(name: str, source: Path) -> int:
    prefix, _, number = name.partition(".")
    if prefix != "direction" or not number.isdigit():
        raise CheckpointError(f"{source}: tensor {name!r} is not named direction.<L>")
    return int(number)


def _looks_pickled(source: Path) -> bool:
    with source.open("rb") as handle:
        head = handle.read(4)
    # Raw pickles start with the PROTO opcode 0x80; torch.save writes a zip archive.
    return head[:1] == b"\x80" or head == b"PK\x03\x04"


def _load_pickled(source: Path, allow_pickle: bool) -> SteeringVector:
    if not allow_pickle:
        raise PickleNotAllowedError(
            f"{source} is a pickled file, which can run code when loaded; convert it to safetensors, "
            "or pass --allow-pickle to load it with torch.load(weights_only=True)"
        )
    state = torch.load(source, map_location="cpu", weights_only=True)
    if isinstance(state, torch.Tensor):
        raise InvalidTensorError(f"{source} holds one bare tensor; a layer index is needed: save {{'direction.L': tensor}}")
    if not isinstance(state, dict):
        raise CheckpointError(f"{source} holds a {type(state).__name__}, expected a dict of direction.<L> tensors")
    directions = {_parse_layer(str(name), source): tensor.float() for name, tensor in state.items()}
    return SteeringVector(directions=directions)


def cosine(first: torch.Tensor, second: torch.Tensor) -> float:
    """Cosine similarity of two vectors in float64."""
    first64, second64 = first.double().flatten(), second.double().flatten()
    return float(first64 @ second64 / (first64.norm() * second64.norm()).clamp_min(1e-30))
