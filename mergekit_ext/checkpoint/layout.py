"""Lookup of the safetensors files that hold a checkpoint's weights, in reading order.

Kept free of torch, so that code can list a checkpoint's files without importing it.
"""

from __future__ import annotations

import json
from pathlib import Path

from mergekit_ext.errors import CheckpointError

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"


def safetensors_files(folder: Path) -> list[Path]:
    """Return the weight files of a checkpoint folder in reading order, or [] when it has no safetensors.

    The index decides when there is one, then `model.safetensors`, then a single loose
    `.safetensors` file. Several loose files without an index raise CheckpointError.
    """
    if (folder / SAFETENSORS_INDEX).exists():
        return files_from_index(folder / SAFETENSORS_INDEX)
    if (folder / SAFETENSORS_SINGLE).exists():
        return [folder / SAFETENSORS_SINGLE]
    loose = sorted(folder.glob("*.safetensors"))
    if len(loose) > 1:
        raise CheckpointError(
            f"{folder}: {len(loose)} safetensors files but no {SAFETENSORS_INDEX}; add the "
            "index file or pass one .safetensors file"
        )
    return loose


def files_from_index(index_path: Path) -> list[Path]:
    """Return the files an index's `weight_map` names, in order of first mention."""
    try:
        index = json.loads(index_path.read_text())
        weight_map = index["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise CheckpointError(
            f"{index_path}: malformed index (needs a 'weight_map' object): {error}"
        ) from error
    files = []
    for file_name in dict.fromkeys(weight_map.values()):
        file = index_path.parent / file_name
        if not file.exists():
            raise CheckpointError(
                f"{index_path}: shard {file_name} is listed in the index but missing; "
                "download the missing shard"
            )
        files.append(file)
    return files
