"""Writes that skip the page cache: in-order bytes staged and written with O_DIRECT."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from mergekit_ext.checkpoint import PlannedTensor, StreamingWriter, direct_write
from mergekit_ext.checkpoint.direct_write import ShardFile
from mergekit_ext.errors import OutputError

from .conftest import leftover_partials
from .test_direct_read import cached_bytes, needs_direct, require_direct

STAGE = 64 * 1024


@pytest.fixture
def small_stage(monkeypatch: pytest.MonkeyPatch) -> None:
    """Stage 64 KiB at a time, so a few hundred KiB cross several full buffers."""
    monkeypatch.setattr(direct_write, "STAGE_BYTES", STAGE)
    monkeypatch.setattr(direct_write, "MIN_DIRECT_BYTES", 1)


def random_bytes(count: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, count, dtype=np.uint8)


def write_pieces(path: Path, data: np.ndarray, cuts: list[int], **options: bool) -> ShardFile:
    handle = ShardFile(path, data.size, **options)
    bounds = [0, *cuts, data.size]
    for start, end in zip(bounds, bounds[1:]):
        handle.write_at(start, data[start:end])
    return handle


@needs_direct
@pytest.mark.usefixtures("small_stage")
def test_in_order_writes_skip_the_page_cache(tmp_path: Path) -> None:
    require_direct(tmp_path)
    data = random_bytes(5 * STAGE + 1234)
    path = tmp_path / "out.bin"
    # Pieces of odd sizes: one inside a buffer, one spanning three, and a tail.
    handle = write_pieces(path, data, [77, 2 * STAGE + 5, 3 * STAGE + 4000])
    assert handle.direct
    handle.close()
    assert path.read_bytes() == data.tobytes()
    # Reading the file above cached it, so the cache check uses a second one.
    second = tmp_path / "second.bin"
    write_pieces(second, data, [STAGE]).close()
    # Every block went out with O_DIRECT, the padded tail too, so no page is cached.
    assert cached_bytes(second) == 0
    assert second.stat().st_size == data.size


@pytest.mark.usefixtures("small_stage")
def test_write_out_of_order_falls_back_to_buffered(tmp_path: Path) -> None:
    data = random_bytes(3 * STAGE + 99, seed=1)
    path = tmp_path / "out.bin"
    handle = ShardFile(path, data.size)
    handle.write_at(0, data[:100])
    handle.write_at(2 * STAGE, data[2 * STAGE :])  # skips ahead
    assert not handle.direct
    handle.write_at(100, data[100 : 2 * STAGE])
    handle.close()
    assert path.read_bytes() == data.tobytes()


@pytest.mark.usefixtures("small_stage")
def test_buffered_only_file_has_the_same_bytes(tmp_path: Path) -> None:
    data = random_bytes(2 * STAGE + 3, seed=2)
    handle = write_pieces(tmp_path / "out.bin", data, [10, STAGE + 7], direct=False)
    assert not handle.direct
    handle.close()
    assert (tmp_path / "out.bin").read_bytes() == data.tobytes()


@needs_direct
@pytest.mark.usefixtures("small_stage")
def test_rejected_direct_write_finishes_buffered(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    require_direct(tmp_path)
    data = random_bytes(3 * STAGE + 500, seed=3)
    path = tmp_path / "out.bin"
    handle = ShardFile(path, data.size)
    assert handle.direct
    direct_descriptor = handle._direct_descriptor
    real_pwrite = os.pwrite

    def reject_direct(descriptor: int, buffer: object, offset: int) -> int:
        if descriptor == direct_descriptor:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_pwrite(descriptor, buffer, offset)

    monkeypatch.setattr(direct_write.os, "pwrite", reject_direct)
    handle.write_at(0, data[: 2 * STAGE + 1])
    assert not handle.direct
    handle.write_at(2 * STAGE + 1, data[2 * STAGE + 1 :])
    handle.close()
    assert path.read_bytes() == data.tobytes()


@needs_direct
def test_disk_full_at_the_last_flush(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """ENOSPC from the write of the staged tail, when the last tensor arrives, names the output."""
    require_direct(tmp_path)
    state = {"a": torch.randn(300_000), "b": torch.randn(1000)}
    plan = [PlannedTensor(name, tuple(t.shape), t.dtype) for name, t in state.items()]

    def full_disk(descriptor: int, buffer: object, offset: int) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OutputError, match="No space left on device"):
        with StreamingWriter(tmp_path / "out", plan) as writer:
            writer.write("a", state["a"])
            assert writer._shards[0].handle is not None and writer._shards[0].handle.direct
            monkeypatch.setattr(direct_write.os, "pwrite", full_disk)
            writer.write("b", state["b"])
    assert not (tmp_path / "out").exists()
    assert leftover_partials(tmp_path) == []


@needs_direct
def test_streaming_writer_output_matches_safetensors(tmp_path: Path) -> None:
    """A shard above MIN_DIRECT_BYTES, written tensor by tensor and in row blocks, loads back exactly."""
    require_direct(tmp_path)
    generator = torch.Generator().manual_seed(4)
    state = {
        "embed": torch.randn(3000, 130, generator=generator).to(torch.bfloat16),
        "norm": torch.randn(130, generator=generator),
        "head": torch.randn(2049, 65, generator=generator),
    }
    plan = [PlannedTensor(name, tuple(t.shape), t.dtype) for name, t in state.items()]
    with StreamingWriter(tmp_path / "out", plan) as writer:
        writer.write("embed", state["embed"][:1001], row_start=0)
        writer.write("embed", state["embed"][1001:], row_start=1001)
        writer.write("norm", state["norm"])
        writer.write("head", state["head"])
        writer.commit()
    assert cached_bytes(tmp_path / "out" / "model.safetensors") == 0
    loaded = load_file(str(tmp_path / "out" / "model.safetensors"))
    for name, tensor in state.items():
        assert torch.equal(loaded[name], tensor), name
