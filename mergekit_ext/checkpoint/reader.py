"""Lazy reader of checkpoints: one safetensors file, a folder, or a sharded folder.

Names, shapes and dtypes come from the headers only, so opening a 70B checkpoint costs
a few milliseconds and no memory. `load` reads one tensor's bytes with `pread` at the
offset the header gives, with O_DIRECT for large tensors not in the page cache
(`mergekit_ext.checkpoint.direct_read`). A memory map would be simpler, but every page it touches
stays in the process's resident set until the map is closed. A streaming merge through
mmap therefore ends up holding all of its inputs, while a plain read holds only the
tensors still referenced.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mergekit_ext.checkpoint.direct_read import RawFile
from mergekit_ext.checkpoint.hashing import StreamingDigest, cached_sha256, files_sha256
from mergekit_ext.checkpoint.head_start import HeadStart
from mergekit_ext.checkpoint.layout import SAFETENSORS_INDEX, SAFETENSORS_SINGLE, files_from_index, safetensors_files
from mergekit_ext.checkpoint.safetensors_header import read_header
from mergekit_ext.errors import CheckpointError, PickleNotAllowedError

logger = logging.getLogger(__name__)

PICKLE_INDEX = "pytorch_model.bin.index.json"
PICKLE_SINGLE = "pytorch_model.bin"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


@dataclass(frozen=True)
class TensorInfo:
    """Name, shape, dtype and location of one tensor, known without loading it."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    file: Path
    offset: int
    nbytes: int


class Checkpoint:
    """A read-only, lazily loaded checkpoint.

    Open with `Checkpoint.open(path)`. Tensors keep the checkpoint's own names and are
    listed in file and offset order, the order that reads the disk sequentially.
    """

    def __init__(self, path: Path, tensors: dict[str, TensorInfo], pickled: bool) -> None:
        self.path = path
        self.folder = path if path.is_dir() else path.parent
        self._tensors = tensors
        self._pickled = pickled
        self._handles: dict[Path, Any] = {}
        self._lock = threading.Lock()
        self._sha256: str | None = None
        self._digest: StreamingDigest | None = None
        # Bytes read ahead before the merge began (see head_start), taken by this checkpoint's reads.
        self.head_start: HeadStart | None = None

    @classmethod
    def open(cls, path: str | Path, *, allow_pickle: bool = False) -> Checkpoint:
        """Open a checkpoint folder or file, reading headers only."""
        path = Path(path).expanduser()
        if not path.exists():
            raise CheckpointError(f"{path}: checkpoint not found; check the path")
        if path.is_file():
            return cls._open_file(path, allow_pickle)
        return cls._open_folder(path, allow_pickle)

    @classmethod
    def _open_file(cls, path: Path, allow_pickle: bool) -> Checkpoint:
        if path.suffix == ".safetensors":
            return cls(path, _infos_from_safetensors([path]), pickled=False)
        if path.suffix in PICKLE_SUFFIXES:
            return cls(path, _infos_from_pickle([path], allow_pickle), pickled=True)
        raise CheckpointError(
            f"{path}: unsupported checkpoint file type {path.suffix!r}; give a .safetensors "
            "file or a checkpoint folder"
        )

    @classmethod
    def _open_folder(cls, folder: Path, allow_pickle: bool) -> Checkpoint:
        files = safetensors_files(folder)
        if files:
            return cls(folder, _infos_from_safetensors(files), pickled=False)
        if (folder / PICKLE_INDEX).exists():
            files = files_from_index(folder / PICKLE_INDEX)
            return cls(folder, _infos_from_pickle(files, allow_pickle), pickled=True)
        if (folder / PICKLE_SINGLE).exists():
            return cls(folder, _infos_from_pickle([folder / PICKLE_SINGLE], allow_pickle), pickled=True)
        raise CheckpointError(
            f"{folder}: no model weights found (expected {SAFETENSORS_SINGLE}, {SAFETENSORS_INDEX} "
            f"or {PICKLE_SINGLE}); check that this is a checkpoint folder, or pass the weight file itself"
        )

    @property
    def names(self) -> list[str]:
        """Tensor names in file and offset order."""
        return list(self._tensors)

    @property
    def files(self) -> list[Path]:
        """Weight files, in the order their tensors are listed."""
        return list(dict.fromkeys(info.file for info in self._tensors.values()))

    @property
    def pickled(self) -> bool:
        return self._pickled

    def __contains__(self, name: str) -> bool:
        return name in self._tensors

    def __len__(self) -> int:
        return len(self._tensors)

    def info(self, name: str) -> TensorInfo:
        """Return the header information of tensor `name`."""
        try:
            return self._tensors[name]
        except KeyError:
            raise CheckpointError(f"{self.path}: tensor {name!r} not found") from None

    @property
    def total_bytes(self) -> int:
        return sum(info.nbytes for info in self._tensors.values())

    @property
    def config(self) -> dict[str, Any] | None:
        """The parsed `config.json` beside the weights, or None."""
        config_path = self.folder / "config.json"
        if not config_path.exists():
            return None
        try:
            return json.loads(config_path.read_text())
        except json.JSONDecodeError as error:
            raise CheckpointError(f"{config_path}: invalid JSON ({error}); fix or remove the file") from error

    def load(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """Read tensor `name` into a new CPU tensor in its stored dtype.

        `rows=(start, stop)` reads only those rows of the first dimension. Rows are
        contiguous in the file, so a slice costs one read of its own bytes.
        """
        info = self.info(name)
        if rows is not None:
            _check_rows(info, rows)
        handle = self._handle(info.file)
        if self._pickled:
            tensor = handle[name]
            return tensor if rows is None else tensor[rows[0] : rows[1]]
        return _read_tensor(handle, info, rows)

    def _handle(self, file: Path) -> Any:
        with self._lock:
            if file not in self._handles:
                if self._pickled:
                    self._handles[file] = _load_pickle(file)
                else:
                    raw = RawFile(file, head_start=self.head_start.for_file(file) if self.head_start else None)
                    if self._digest is not None:
                        raw.digest = (self._digest, self._digest.file_start(file))
                    self._handles[file] = raw
            return self._handles[file]

    def sha256(self) -> str:
        """SHA-256 of the weight files' bytes, in file order (remembered across runs)."""
        if self._sha256 is None:
            self._sha256 = files_sha256(self.files)
        return self._sha256

    def start_sha256(self) -> Callable[[], str]:
        """Start hashing the weight files from the `load` calls that follow.

        Return a function that finishes the digest, reading only what `load` did not,
        and returns the same value as `sha256`. A digest already known, in this object
        or in the cache, costs nothing. Pickled checkpoints are hashed when it is called.
        """
        if self._sha256 is None:
            self._sha256 = cached_sha256(self.files)
        if self._sha256 is not None or self._pickled:
            return self.sha256
        digest = StreamingDigest(self.files)
        # `load` never reads the headers, so they are fed here: each file's bytes up to its
        # first tensor (the whole file when it has none).
        data_starts: dict[Path, int] = {}
        for info in self._tensors.values():
            data_starts[info.file] = min(info.offset, data_starts.get(info.file, info.offset))
        for file in self.files:
            with file.open("rb") as handle:
                header = handle.read(data_starts[file]) if file in data_starts else handle.read()
            digest.feed(digest.file_start(file), memoryview(header))
        with self._lock:
            self._digest = digest
            for file, handle in self._handles.items():
                handle.digest = (digest, digest.file_start(file))

        def finish() -> str:
            with self._lock:
                self._digest = None
                for handle in self._handles.values():
                    handle.digest = None
            self._sha256 = digest.hexdigest()
            return self._sha256

        return finish

    def close(self) -> None:
        """Close open files; later `load` calls reopen them."""
        with self._lock:
            for handle in self._handles.values():
                if isinstance(handle, RawFile):
                    handle.close()
            self._handles.clear()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown may have torn down os already
            pass

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.path)!r}, tensors={len(self)})"


def _check_rows(info: TensorInfo, rows: tuple[int, int]) -> None:
    start, stop = rows
    if not info.shape or not 0 <= start <= stop <= info.shape[0]:
        raise CheckpointError(
            f"{info.file}: rows {start}:{stop} are outside tensor {info.name!r} of shape {info.shape}; "
            "request rows from 0 to the first dimension of a tensor with at least one dimension"
        )


def _read_tensor(file: RawFile, info: TensorInfo, rows: tuple[int, int] | None = None) -> torch.Tensor:
    shape = info.shape
    offset, nbytes = info.offset, info.nbytes
    if rows is not None:
        row_bytes = info.nbytes // info.shape[0] if info.shape[0] else 0
        offset += rows[0] * row_bytes
        nbytes = (rows[1] - rows[0]) * row_bytes
        shape = (rows[1] - rows[0], *info.shape[1:])
    if nbytes == 0:
        return torch.empty(shape, dtype=info.dtype)
    data = file.read(offset, nbytes, f"tensor {info.name!r}")
    if data.storage_offset() % info.dtype.itemsize:
        # The tensor's offset in the file is not a multiple of its element size.
        data = data.clone()
    return data.view(info.dtype).reshape(shape)


def _infos_from_safetensors(files: list[Path]) -> dict[str, TensorInfo]:
    entries = []
    for file in files:
        header = read_header(file)
        for entry in header.entries.values():
            entries.append(
                TensorInfo(
                    name=entry.name,
                    shape=entry.shape,
                    dtype=SAFETENSORS_DTYPES[entry.dtype],
                    file=file,
                    offset=header.data_start + entry.begin,
                    nbytes=entry.nbytes,
                )
            )
    return _ordered(entries)


def _ordered(entries: list[TensorInfo]) -> dict[str, TensorInfo]:
    file_rank = {file: rank for rank, file in enumerate(dict.fromkeys(e.file for e in entries))}
    entries.sort(key=lambda entry: (file_rank[entry.file], entry.offset))
    tensors: dict[str, TensorInfo] = {}
    for entry in entries:
        if entry.name in tensors:
            raise CheckpointError(
                f"tensor {entry.name!r} appears in both {tensors[entry.name].file} and "
                f"{entry.file}; the checkpoint is inconsistent"
            )
        tensors[entry.name] = entry
    return tensors


def _load_pickle(file: Path) -> dict[str, torch.Tensor]:
    # weights_only=True refuses arbitrary objects, so a malicious pickle cannot run code.
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for a bad or unsafe pickle
        reason = "not a valid PyTorch checkpoint"
        if "weights_only" in str(error) or "Unsupported global" in str(error):
            reason = "it holds objects other than tensors, which could run code when unpickled"
        raise CheckpointError(
            f"{file}: cannot load pickled weights safely: {reason}; convert it to safetensors "
            "in a trusted environment"
        ) from error
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{file}: pickled file does not hold a dict of tensors")
    return state


def _infos_from_pickle(files: list[Path], allow_pickle: bool) -> dict[str, TensorInfo]:
    if not allow_pickle:
        raise PickleNotAllowedError(
            f"{files[0]}: pickled weights can run code when loaded; convert the checkpoint "
            "to safetensors, or pass --allow-pickle to load it with weights_only=True"
        )
    logger.warning("Loading pickled weights from %s with weights_only=True", files[0].parent)
    entries = []
    for file in files:
        state = _load_pickle(file)
        for position, (name, tensor) in enumerate(state.items()):
            entries.append(
                TensorInfo(
                    name=name,
                    shape=tuple(tensor.shape),
                    dtype=tensor.dtype,
                    file=file,
                    offset=position,
                    nbytes=tensor.numel() * tensor.element_size(),
                )
            )
    return _ordered(entries)
