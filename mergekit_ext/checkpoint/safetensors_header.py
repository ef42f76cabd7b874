"""Validation of safetensors headers before any tensor is mapped.

The format is an 8-byte little-endian header length N, N bytes of JSON mapping tensor
names to `{"dtype", "shape", "data_offsets"}` (offsets relative to the end of the
header), then the data. Reading the header ourselves lets us name the file and the
fault (truncated file, malformed JSON, offsets past the end) in the error.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

from mergekit_ext.errors import CheckpointError

# Bytes per element of each safetensors dtype string.
DTYPE_SIZES: dict[str, int] = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
}

# Headers larger than this are rejected as malformed; real ones are a few MB at most.
MAX_HEADER_BYTES = 100 * 1024 * 1024


@dataclass(frozen=True)
class HeaderEntry:
    """One tensor as described by a safetensors header."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass(frozen=True)
class SafetensorsHeader:
    """The parsed header of one safetensors file."""

    path: Path
    data_start: int
    entries: dict[str, HeaderEntry]
    metadata: dict[str, str]


def read_header(path: Path) -> SafetensorsHeader:
    """Parse and check the header of `path`; raise `CheckpointError` naming the fault."""
    try:
        file_size = path.stat().st_size
        with path.open("rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise CheckpointError(
                    f"{path}: file is truncated ({file_size} bytes, shorter than the 8-byte "
                    "safetensors header length); re-download or re-export the file"
                )
            (header_size,) = struct.unpack("<Q", prefix)
            if header_size > MAX_HEADER_BYTES or 8 + header_size > file_size:
                raise CheckpointError(
                    f"{path}: malformed or truncated safetensors header (header length "
                    f"{header_size} bytes, file size {file_size} bytes); re-download or "
                    "re-export the file"
                )
            raw = handle.read(header_size)
    except OSError as error:
        raise CheckpointError(f"{path}: cannot read file: {error.strerror}") from error

    try:
        parsed = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(
            f"{path}: malformed safetensors header (invalid JSON: {error}); the file is "
            "corrupt or not a safetensors file"
        ) from error
    if not isinstance(parsed, dict):
        raise CheckpointError(f"{path}: malformed safetensors header (not a JSON object)")

    data_start = 8 + header_size
    data_size = file_size - data_start
    metadata = parsed.pop("__metadata__", None) or {}
    entries: dict[str, HeaderEntry] = {}
    for name, description in parsed.items():
        entries[name] = _parse_entry(path, name, description, data_size)
    covered = max((entry.end for entry in entries.values()), default=0)
    if covered < data_size:
        # safetensors 0.8.0 rejects such files too ("incomplete metadata, file not fully covered").
        raise CheckpointError(
            f"{path}: {data_size - covered} bytes follow the last tensor, which a safetensors file "
            "may not contain; the file is damaged or was appended to, so re-download or re-export it"
        )
    return SafetensorsHeader(path=path, data_start=data_start, entries=entries, metadata=metadata)


def _parse_entry(path: Path, name: str, description: object, data_size: int) -> HeaderEntry:
    if not isinstance(description, dict):
        raise CheckpointError(f"{path}: malformed safetensors header entry for tensor {name!r}")
    dtype = description.get("dtype")
    shape = description.get("shape")
    offsets = description.get("data_offsets")
    if dtype not in DTYPE_SIZES:
        raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {dtype!r}")
    if not isinstance(shape, list) or not all(isinstance(size, int) and size >= 0 for size in shape):
        raise CheckpointError(f"{path}: tensor {name!r} has an invalid shape {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
        raise CheckpointError(f"{path}: tensor {name!r} has invalid data_offsets {offsets!r}")

    begin, end = offsets
    expected = DTYPE_SIZES[dtype]
    for size in shape:
        expected *= size
    if end - begin != expected or begin < 0:
        raise CheckpointError(
            f"{path}: tensor {name!r} spans {end - begin} bytes but shape {shape} of {dtype} "
            f"needs {expected}; the file is corrupt"
        )
    if end > data_size:
        raise CheckpointError(
            f"{path}: file is truncated: tensor {name!r} ends at byte {end} of the data "
            f"section but only {data_size} bytes are present; re-download or re-export the file"
        )
    return HeaderEntry(name=name, dtype=dtype, shape=tuple(shape), begin=begin, end=end)
