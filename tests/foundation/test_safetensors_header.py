"""Header validation names the file and the fault for corrupt safetensors files."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from mergekit_ext.checkpoint import Checkpoint
from mergekit_ext.checkpoint.safetensors_header import read_header
from mergekit_ext.errors import CheckpointError


def write_file(path: Path) -> Path:
    save_file({"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(4)}, str(path))
    return path


def test_header_parses_shapes_and_offsets(tmp_path: Path) -> None:
    header = read_header(write_file(tmp_path / "x.safetensors"))
    assert header.entries["a"].shape == (2, 3)
    assert header.entries["a"].dtype == "F32"
    assert header.entries["a"].nbytes == 24
    assert header.entries["b"].nbytes == 16


def test_truncated_data_is_rejected(tmp_path: Path) -> None:
    path = write_file(tmp_path / "x.safetensors")
    data = path.read_bytes()
    path.write_bytes(data[:-5])
    with pytest.raises(CheckpointError, match="truncated") as error:
        Checkpoint.open(path)
    assert str(path) in str(error.value)


def test_file_shorter_than_length_prefix(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    path.write_bytes(b"\x01\x02")
    with pytest.raises(CheckpointError, match="truncated"):
        Checkpoint.open(path)


def test_header_length_past_end(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    path.write_bytes(struct.pack("<Q", 10_000) + b"{}")
    with pytest.raises(CheckpointError, match="malformed or truncated"):
        Checkpoint.open(path)


def test_malformed_json_header(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    body = b"{not json"
    path.write_bytes(struct.pack("<Q", len(body)) + body)
    with pytest.raises(CheckpointError, match="invalid JSON"):
        Checkpoint.open(path)


def test_offsets_disagreeing_with_shape(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    header = json.dumps({"a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 12]}}).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + bytes(12))
    with pytest.raises(CheckpointError, match="corrupt"):
        Checkpoint.open(path)


def test_unsupported_dtype(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    header = json.dumps({"a": {"dtype": "C64", "shape": [1], "data_offsets": [0, 8]}}).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + bytes(8))
    with pytest.raises(CheckpointError, match="unsupported dtype"):
        Checkpoint.open(path)


def test_bytes_after_last_tensor_are_rejected(tmp_path: Path) -> None:
    path = write_file(tmp_path / "model.safetensors")
    with path.open("ab") as handle:
        handle.write(b"\x00" * 3000)
    with pytest.raises(CheckpointError, match="3000 bytes follow the last tensor") as error:
        read_header(path)
    assert str(path) in str(error.value)
