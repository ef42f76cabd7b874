"""Export and import of llama.cpp control vectors (GGUF).

llama.cpp reads a control vector as a GGUF file with `general.architecture =
controlvector` and float32 tensors `direction.N`. It adds `direction.N` to the output
of decoder block N (0-based) and rejects `direction.0`, because its control-vector
layers start at 1. Our layer L is also the output of block L, so the mapping is the
identity and a vector at layer 0 cannot be exported.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from mergekit_ext.errors import CheckpointError, RecipeError
from mergekit_ext.steer.vector import SteeringRecipe, SteeringVector

ARCHITECTURE = "controlvector"


def export_gguf(vector: SteeringVector, path: str | Path, alpha: float = 1.0, model_hint: str = "") -> Path:
    """Write alpha * direction.L for every layer L >= 1 into a control-vector GGUF file."""
    import gguf

    if 0 in vector.directions:
        raise RecipeError(
            "llama.cpp control vectors cannot steer the output of block 0 (direction.0 is rejected); "
            "extract at layer 1 or above"
        )
    target = Path(path)
    writer = gguf.GGUFWriter(str(target), arch=ARCHITECTURE)
    writer.add_string(f"{ARCHITECTURE}.model_hint", model_hint or vector.recipe.model or "unknown")
    writer.add_uint32(f"{ARCHITECTURE}.layer_count", len(vector.layers))
    writer.add_string("mergekit_ext.recipe", vector.recipe.to_json())
    writer.add_float32("mergekit_ext.alpha", float(alpha))
    for layer in vector.layers:
        values = (float(alpha) * vector.directions[layer].float()).cpu().numpy().astype(np.float32)
        writer.add_tensor(f"direction.{layer}", values)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return target


def _string_field(reader: object, key: str) -> str | None:
    field = reader.get_field(key)  # type: ignore[attr-defined]
    if field is None:
        return None
    return bytes(field.parts[field.data[0]]).decode("utf-8")


def import_gguf(path: str | Path) -> SteeringVector:
    """Read a control-vector GGUF file; directions are the stored (already scaled) tensors."""
    import gguf

    source = Path(path)
    if not source.is_file():
        raise CheckpointError(f"GGUF file {source} not found")
    try:
        reader = gguf.GGUFReader(str(source))
    except (ValueError, OSError) as error:
        raise CheckpointError(f"{source} is not a readable GGUF file ({error})") from error
    architecture = _string_field(reader, "general.architecture")
    if architecture != ARCHITECTURE:
        raise CheckpointError(f"{source}: general.architecture is {architecture!r}, expected {ARCHITECTURE!r}")
    directions: dict[int, torch.Tensor] = {}
    for tensor in reader.tensors:
        prefix, _, number = tensor.name.partition(".")
        if prefix != "direction" or not number.isdigit() or int(number) == 0:
            raise CheckpointError(f"{source}: tensor {tensor.name!r} is not a valid direction.N with N >= 1")
        if tensor.tensor_type != gguf.GGMLQuantizationType.F32:
            raise CheckpointError(f"{source}: tensor {tensor.name} is {tensor.tensor_type.name}, expected F32")
        directions[int(number)] = torch.from_numpy(np.array(tensor.data, dtype=np.float32).reshape(-1).copy())
    if not directions:
        raise CheckpointError(f"{source} contains no direction.N tensor")
    recipe_text = _string_field(reader, "mergekit_ext.recipe")
    recipe = SteeringRecipe.from_json(recipe_text) if recipe_text else SteeringRecipe()
    alpha_field = reader.get_field("mergekit_ext.alpha")
    if alpha_field is not None:
        stored_alpha = float(alpha_field.parts[alpha_field.data[0]][0])
        # The stored tensors already include the export scale, so apply them with alpha 1.
        recipe = replace(recipe, alpha=1.0, extra={**recipe.extra, "gguf_scale": repr(stored_alpha)})
    return SteeringVector(directions=directions, recipe=recipe)
