"""Reads that skip the page cache: O_DIRECT for uncached ranges, buffered for cached ones."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from mergekit_ext.checkpoint import direct_read
from mergekit_ext.checkpoint.direct_read import ALIGNMENT, MIN_DIRECT_BYTES, RawFile
from mergekit_ext.checkpoint.reader import Checkpoint
from mergekit_ext.errors import CheckpointError

needs_direct = pytest.mark.skipif(
    not hasattr(os, "O_DIRECT") or direct_read._LIBC is None, reason="needs O_DIRECT and mincore (Linux)"
)


def require_direct(folder: Path) -> None:
    """Skip the test where `folder`'s file system rejects O_DIRECT (tmpfs on older Linux kernels, for one)."""
    probe = folder / "direct-probe"
    probe.write_bytes(b"\0" * ALIGNMENT)
    try:
        os.close(os.open(probe, os.O_RDONLY | os.O_DIRECT))
    except OSError as error:
        pytest.skip(f"the file system of {folder} rejects O_DIRECT: {error}")
    finally:
        probe.unlink()


def evict(path: Path, required: bool = True) -> None:
    """Drop `path`'s clean pages from the page cache, as after a reboot.

    With `required`, skip the test when the pages stay.
    """
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
        os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(descriptor)
    if required and hasattr(os, "O_DIRECT") and direct_read._LIBC is not None and cached_bytes(path) > 0:
        # tmpfs keeps every page in memory, and other file systems may ignore the advice.
        pytest.skip(f"the pages of {path} stay in the page cache")


def cached_bytes(path: Path) -> int:
    raw = RawFile(path)
    try:
        assert raw._direct_ready()
        return raw._cached_bytes(0, raw.size)
    finally:
        raw.close()


def read_range(path: Path, offset: int, nbytes: int, direct: bool = True) -> bytes:
    raw = RawFile(path, direct=direct)
    try:
        return raw.read(offset, nbytes, "range").numpy().tobytes()
    finally:
        raw.close()


def random_bytes(count: int, seed: int = 0) -> bytes:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (count,), dtype=torch.uint8, generator=generator).numpy().tobytes()


@pytest.fixture
def data_file(tmp_path: Path) -> tuple[Path, bytes]:
    # 3 MB and a bit, so reads at odd offsets cross page and alignment boundaries.
    content = random_bytes(3 * MIN_DIRECT_BYTES + 12345)
    path = tmp_path / "data.bin"
    path.write_bytes(content)
    return path, content


@needs_direct
@pytest.mark.parametrize("offset", [0, 1, ALIGNMENT - 1, ALIGNMENT, 5 * ALIGNMENT + 7])
def test_uncached_range_matches_file(data_file: tuple[Path, bytes], offset: int) -> None:
    path, content = data_file
    require_direct(path.parent)
    evict(path)
    nbytes = 2 * MIN_DIRECT_BYTES + 3
    data = read_range(path, offset, nbytes)
    assert len(data) == nbytes
    assert data == content[offset : offset + nbytes]


@needs_direct
def test_uncached_read_skips_page_cache(data_file: tuple[Path, bytes]) -> None:
    path, content = data_file
    require_direct(path.parent)
    evict(path)
    assert read_range(path, 0, len(content)) == content
    # A buffered read would have left the whole file in the page cache.
    assert cached_bytes(path) < MIN_DIRECT_BYTES


@needs_direct
def test_small_read_skips_read_ahead(data_file: tuple[Path, bytes]) -> None:
    path, content = data_file
    require_direct(path.parent)
    evict(path)
    # A small tensor is read buffered. Read-ahead after it (128 kB by default, 8 MB on
    # some virtual disks) would cache the large range that follows, and that range
    # would then be copied from the page cache instead of read with O_DIRECT.
    raw = RawFile(path)
    try:
        assert raw.read(0, 3 * ALIGNMENT, "small").numpy().tobytes() == content[: 3 * ALIGNMENT]
        assert raw._direct_ready()
        assert raw._cached_bytes(4 * ALIGNMENT, MIN_DIRECT_BYTES) == 0
    finally:
        raw.close()


@needs_direct
def test_partly_cached_range_read_direct(data_file: tuple[Path, bytes]) -> None:
    path, content = data_file
    require_direct(path.parent)
    evict(path)
    prefix = MIN_DIRECT_BYTES + 5 * ALIGNMENT
    # Cache the prefix without read-ahead, so no read still in flight adds pages later.
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_RANDOM)
        assert os.pread(descriptor, prefix, 0) == content[:prefix]
    finally:
        os.close(descriptor)
    cached_before = cached_bytes(path)
    assert cached_before >= prefix
    raw = RawFile(path)
    try:
        data = raw.read(100, len(content) - 100, "range")
    finally:
        raw.close()
    assert data.numpy().tobytes() == content[100:]
    # Read whole with O_DIRECT, so the page cache contains no more of the file than before.
    assert cached_bytes(path) <= cached_before


@needs_direct
def test_cached_range_read_buffered(data_file: tuple[Path, bytes]) -> None:
    path, content = data_file
    require_direct(path.parent)
    assert path.read_bytes() == content
    raw = RawFile(path)
    try:
        assert raw._direct_ready()
        assert raw._cached_bytes(100, 2 * MIN_DIRECT_BYTES) == 2 * MIN_DIRECT_BYTES
        data = raw.read(100, 2 * MIN_DIRECT_BYTES, "range")
    finally:
        raw.close()
    assert data.numpy().tobytes() == content[100 : 100 + 2 * MIN_DIRECT_BYTES]


def test_buffered_fallback_matches(data_file: tuple[Path, bytes]) -> None:
    path, content = data_file
    data = read_range(path, 17, 2 * MIN_DIRECT_BYTES, direct=False)
    assert data == content[17 : 17 + 2 * MIN_DIRECT_BYTES]


@needs_direct
def test_range_past_end_is_truncated(data_file: tuple[Path, bytes]) -> None:
    path, content = data_file
    require_direct(path.parent)
    evict(path)
    with pytest.raises(CheckpointError, match="file is truncated: range ends past the end"):
        read_range(path, len(content) - MIN_DIRECT_BYTES, 2 * MIN_DIRECT_BYTES)


@pytest.mark.skipif(not Path("/dev/shm").is_dir(), reason="needs /dev/shm (tmpfs)")
def test_tmpfs_read_matches() -> None:
    # tmpfs rejects O_DIRECT on older Linux kernels, and its pages are always in memory. The
    # read must return the bytes either way.
    content = random_bytes(2 * MIN_DIRECT_BYTES, seed=1)
    path = Path("/dev/shm") / f"mergekit-ext-test-{os.getpid()}.bin"
    path.write_bytes(content)
    try:
        data = read_range(path, 3, MIN_DIRECT_BYTES + 1)
    finally:
        path.unlink()
    assert data == content[3 : 4 + MIN_DIRECT_BYTES]


@needs_direct
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_checkpoint_load_uncached(tmp_path: Path, dtype: torch.dtype) -> None:
    generator = torch.Generator().manual_seed(2)
    # A 1-byte tensor first puts the large tensors at odd file offsets.
    state = {
        "a.odd": torch.zeros(1, dtype=torch.uint8),
        "b.large": torch.randn(1024, 700, generator=generator).to(dtype),
        "c.small": torch.randn(10, generator=generator).to(dtype),
        "d.large": torch.randn(900, 800, generator=generator).to(dtype),
    }
    require_direct(tmp_path)
    path = tmp_path / "model.safetensors"
    save_file(state, str(path))
    evict(path)
    checkpoint = Checkpoint.open(path)
    try:
        for name, tensor in state.items():
            assert torch.equal(checkpoint.load(name), tensor), name
        evict(path)
        assert torch.equal(checkpoint.load("d.large", rows=(300, 900)), state["d.large"][300:900])
    finally:
        checkpoint.close()


@needs_direct
def test_checkpoint_truncated_uncached(tmp_path: Path) -> None:
    state = {"w": torch.randn(1024, 1024)}
    path = tmp_path / "model.safetensors"
    save_file(state, str(path))
    checkpoint = Checkpoint.open(path)
    os.truncate(path, path.stat().st_size - 3 * MIN_DIRECT_BYTES)
    evict(path, required=False)
    try:
        with pytest.raises(CheckpointError, match="file is truncated: tensor 'w'"):
            checkpoint.load("w")
    finally:
        checkpoint.close()


@needs_direct
def test_misaligned_tensor_loads(tmp_path: Path) -> None:
    # Other writers may place a float32 tensor at an offset that is not a multiple of
    # 4; the reader then copies it to an aligned buffer.
    weights = torch.randn(1024, 300, generator=torch.Generator().manual_seed(3))
    payload = weights.numpy().tobytes()
    header = {
        "pad": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]},
        "w": {"dtype": "F32", "shape": [1024, 300], "data_offsets": [1, 1 + len(payload)]},
    }
    encoded = json.dumps(header).encode()
    path = tmp_path / "model.safetensors"
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + b"\x00" + payload)
    evict(path, required=False)
    checkpoint = Checkpoint.open(path)
    try:
        loaded = checkpoint.load("w")
    finally:
        checkpoint.close()
    assert torch.equal(loaded, weights)
