"""Streaming writer of sharded safetensors checkpoints.

The writer is given the plan (every output tensor's name, shape and dtype) up front.
It lays out the shards and writes each shard's header at once, so a tensor goes to
its place on disk as soon as it is produced. Writes in file order pass through an
8 MB staging buffer and O_DIRECT, skipping the page cache (`direct_write`). Output
goes to a temporary folder beside the target, which `commit` renames into place. An
exception inside the `with` block removes the temporary folder, so no half-written
output is left at the target.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import struct
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
import numpy as np
import torch

from mergekit_ext.checkpoint.direct_write import ShardFile
from mergekit_ext.checkpoint.output_folder import check_output_folder
from mergekit_ext.critical import critical_section
from mergekit_ext.errors import OutputError

logger = logging.getLogger(__name__)

DEFAULT_SHARD_SIZE = 5 * 1000**3  # bytes, as in transformers' save_pretrained "5GB"
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
DISK_MARGIN_BYTES = 16 * 1024 * 1024  # room kept for config, tokenizer and card files

TORCH_TO_SAFETENSORS: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
}


@dataclass(frozen=True)
class PlannedTensor:
    """An output tensor the writer expects: name, shape and dtype."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        count = 1
        for size in self.shape:
            count *= size
        return count * torch.empty((), dtype=self.dtype).element_size()


@dataclass
class _Slot:
    shard: int
    offset: int  # absolute byte offset of the tensor data in its shard file
    planned: PlannedTensor
    written: int = 0  # bytes written so far, because a tensor may arrive in row blocks


class _Shard:
    def __init__(self, file_name: str) -> None:
        self.file_name = file_name
        self.tensors: list[PlannedTensor] = []
        self.header_bytes = b""
        self.remaining = 0
        self.size = 0
        self.handle: ShardFile | None = None


def parse_size(text: str | int) -> int:
    """Parse a size such as `5GB`, `500MB`, `2GiB` or a plain byte count."""
    if isinstance(text, int):
        return text
    units = {"kib": 1024, "mib": 1024**2, "gib": 1024**3, "kb": 1000, "mb": 1000**2, "gb": 1000**3, "b": 1}
    lowered = text.strip().lower()
    for unit, factor in units.items():
        if lowered.endswith(unit):
            number = lowered[: -len(unit)].strip()
            break
    else:
        number, factor = lowered, 1
    try:
        value = float(number)
    except ValueError:
        raise OutputError(f"invalid size {text!r}; use a byte count or a value such as 5GB or 500MB") from None
    if value <= 0:
        raise OutputError(f"invalid size {text!r}; it must be positive")
    return int(value * factor)


class StreamingWriter:
    """Write a planned set of tensors into HF-layout shards, then commit atomically."""

    def __init__(
        self,
        output: str | Path,
        plan: Sequence[PlannedTensor],
        *,
        shard_size: int = DEFAULT_SHARD_SIZE,
        force: bool = False,
        inputs: Iterable[Path] = (),
        metadata: dict[str, str] | None = None,
    ) -> None:
        self.output = Path(output).expanduser()
        check_output_folder(self.output, inputs, force)
        if not plan:
            raise OutputError(f"nothing to write to {self.output}: the plan has no tensors")

        self._force = force
        self._metadata = {"format": "pt", **(metadata or {})}
        self._slots: dict[str, _Slot] = {}
        self._shards = self._layout(plan, shard_size)
        self.total_bytes = sum(p.nbytes for p in plan)
        self.bytes_written = 0
        self._check_free_space()

        self.output.parent.mkdir(parents=True, exist_ok=True)
        self.temporary = self.output.parent / f".{self.output.name}.partial-{uuid.uuid4().hex[:8]}"
        self.temporary.mkdir()
        self._committed = False

    def _layout(self, plan: Sequence[PlannedTensor], shard_size: int) -> list[_Shard]:
        groups: list[list[PlannedTensor]] = [[]]
        current = 0
        for planned in plan:
            if planned.name in self._slots:
                raise OutputError(f"tensor {planned.name!r} is planned twice")
            if groups[-1] and current + planned.nbytes > shard_size:
                groups.append([])
                current = 0
            groups[-1].append(planned)
            current += planned.nbytes
            self._slots[planned.name] = _Slot(shard=len(groups) - 1, offset=0, planned=planned)

        count = len(groups)
        shards = []
        for number, group in enumerate(groups):
            name = SINGLE_NAME if count == 1 else f"model-{number + 1:05d}-of-{count:05d}.safetensors"
            shard = _Shard(name)
            shard.tensors = group
            shard.header_bytes = self._header(group)
            shard.remaining = len(group)
            data_start = len(shard.header_bytes)
            position = 0
            for planned in group:
                self._slots[planned.name].offset = data_start + position
                position += planned.nbytes
            shard.size = data_start + position
            shards.append(shard)
        return shards

    def _header(self, group: list[PlannedTensor]) -> bytes:
        header: dict[str, object] = {"__metadata__": self._metadata}
        position = 0
        for planned in group:
            header[planned.name] = {
                "dtype": TORCH_TO_SAFETENSORS[planned.dtype],
                "shape": list(planned.shape),
                "data_offsets": [position, position + planned.nbytes],
            }
            position += planned.nbytes
        encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
        encoded += b" " * (-len(encoded) % 8)  # data starts 8-byte aligned
        return struct.pack("<Q", len(encoded)) + encoded

    def _check_free_space(self) -> None:
        probe = self.output.parent
        while not probe.exists():
            probe = probe.parent
        free = shutil.disk_usage(probe).free
        needed = self.total_bytes + sum(len(s.header_bytes) for s in self._shards) + DISK_MARGIN_BYTES
        if free < needed:
            raise OutputError(
                f"not enough free disk space for {self.output}: the output needs "
                f"{needed / 1e9:.2f} GB and {probe} has {free / 1e9:.2f} GB free; free some space "
                "or choose another output folder"
            )

    @property
    def planned_names(self) -> list[str]:
        return list(self._slots)

    def write(self, name: str, tensor: torch.Tensor, row_start: int | None = None) -> None:
        """Write one planned tensor; its shape and dtype must match the plan.

        With `row_start`, `tensor` contains only the rows from `row_start` on (all other
        dimensions as planned), and the tensor counts as written once all its rows are.
        """
        slot = self._slots.get(name)
        if slot is None:
            raise OutputError(f"tensor {name!r} was not planned for {self.output}")
        planned = slot.planned
        shape = tuple(tensor.shape)
        offset = slot.offset
        nbytes = planned.nbytes
        if row_start is None:
            matches = shape == planned.shape
        else:
            matches = bool(planned.shape) and shape[1:] == planned.shape[1:] and (
                0 <= row_start and row_start + shape[0] <= planned.shape[0]
            )
            if matches and planned.shape[0]:
                row_bytes = planned.nbytes // planned.shape[0]
                offset += row_start * row_bytes
                nbytes = shape[0] * row_bytes
        if not matches or tensor.dtype != planned.dtype:
            rows = "" if row_start is None else f" (rows from {row_start})"
            raise OutputError(
                f"tensor {name!r}{rows} has shape {shape} and dtype {tensor.dtype}, "
                f"but {planned.shape} and {planned.dtype} were planned"
            )
        if slot.written + nbytes > planned.nbytes:
            raise OutputError(f"tensor {name!r} was written more than once; write each row block once")
        shard = self._shards[slot.shard]
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
        completes_tensor = slot.written + nbytes == planned.nbytes
        try:
            handle = self._open_shard(shard)
            handle.write_at(offset, data)
            if completes_tensor and shard.remaining == 1:
                # The shard's last tensor: write what is staged and close the file.
                shard.handle = None
                handle.close()
        except OSError as error:
            raise OutputError(
                f"failed to write tensor {name!r} to {self.output}: {error.strerror}; "
                "free some disk space or choose another output folder"
            ) from error
        self.bytes_written += nbytes
        slot.written += nbytes
        if completes_tensor:
            shard.remaining -= 1

    def _open_shard(self, shard: _Shard) -> ShardFile:
        if shard.handle is None:
            shard.handle = ShardFile(self.temporary / shard.file_name, shard.size)
            shard.handle.write_at(0, np.frombuffer(shard.header_bytes, dtype=np.uint8))
        return shard.handle

    def write_text(self, relative_path: str, text: str) -> None:
        """Write a text file (card, recipe, config) into the output folder."""
        target = self.temporary / relative_path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text, encoding="utf-8")

    def copy_file(self, source: Path, relative_path: str | None = None) -> None:
        """Copy `source` into the output folder (under its own name by default)."""
        target = self.temporary / (relative_path or source.name)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)

    @property
    def folder(self) -> Path:
        """The temporary folder that becomes the output on commit."""
        return self.temporary

    def commit(self) -> Path:
        """Check that every planned tensor was written, write the index and rename into place."""
        missing = [shard.file_name for shard in self._shards if shard.remaining]
        if missing:
            unwritten = [n for n, s in self._slots.items() if s.written < s.planned.nbytes]
            raise OutputError(
                f"cannot finish {self.output}: {sum(s.remaining for s in self._shards)} planned "
                f"tensors were not written (for example {(unwritten or missing)[0]!r})"
            )
        if len(self._shards) > 1:
            weight_map = {name: self._shards[slot.shard].file_name for name, slot in self._slots.items()}
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
            self.write_text(INDEX_NAME, json.dumps(index, indent=2) + "\n")

        with critical_section():
            replaced = None
            if self.output.exists():
                replaced = self.output.parent / f".{self.output.name}.replaced-{uuid.uuid4().hex[:8]}"
                os.replace(self.output, replaced)
            try:
                os.replace(self.temporary, self.output)
            except BaseException:
                if replaced is not None:
                    os.replace(replaced, self.output)  # the old output goes back in place
                raise
            self._committed = True
            if replaced is not None:
                shutil.rmtree(replaced, ignore_errors=True)
        logger.debug("Committed %s (%d shards, %d bytes)", self.output, len(self._shards), self.total_bytes)
        return self.output

    def abort(self) -> None:
        """Close open shards and remove the temporary folder."""
        for shard in self._shards:
            if shard.handle is not None:
                shard.handle.abort()
                shard.handle = None
        shutil.rmtree(self.temporary, ignore_errors=True)

    def __enter__(self) -> StreamingWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if exc_type is not None or not self._committed:
            self.abort()
