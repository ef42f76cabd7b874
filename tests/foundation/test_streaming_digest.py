"""SHA-256 of input files computed from the reads of a merge."""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from mergekit_ext.checkpoint import Checkpoint
from mergekit_ext.checkpoint import hashing
from mergekit_ext.checkpoint.hashing import StreamingDigest, cached_sha256, files_sha256
from mergekit_ext.engine import MergeOptions, run_recipe
from mergekit_ext.errors import CheckpointError
from mergekit_ext.recipe import parse_recipe

ModelFactory = Callable[..., list[Path]]


@pytest.fixture(autouse=True)
def private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MERGEKIT_EXT_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def two_files(tmp_path: Path) -> tuple[list[Path], bytes]:
    generator = random.Random(0)
    first = bytes(generator.getrandbits(8) for _ in range(70_000))
    second = bytes(generator.getrandbits(8) for _ in range(50_003))
    paths = [tmp_path / "a.bin", tmp_path / "b.bin"]
    paths[0].write_bytes(first)
    paths[1].write_bytes(second)
    return paths, first + second


def pieces(total: int, size: int) -> list[tuple[int, int]]:
    return [(start, min(start + size, total)) for start in range(0, total, size)]


def test_in_order_feed_matches_hashlib(two_files: tuple[list[Path], bytes]) -> None:
    files, content = two_files
    digest = StreamingDigest(files)
    for start, end in pieces(len(content), 9_999):
        digest.feed(start, memoryview(content)[start:end])
    assert digest.hexdigest() == hashlib.sha256(content).hexdigest()


def test_shuffled_feed_matches_hashlib(two_files: tuple[list[Path], bytes]) -> None:
    files, content = two_files
    parts = pieces(len(content), 7_001)
    random.Random(1).shuffle(parts)
    digest = StreamingDigest(files)
    for start, end in parts:
        digest.feed(start, memoryview(content)[start:end])
    assert digest.hexdigest() == hashlib.sha256(content).hexdigest()


def test_overlapping_and_repeated_feeds(two_files: tuple[list[Path], bytes]) -> None:
    files, content = two_files
    digest = StreamingDigest(files)
    for start, end in [(0, 5000), (3000, 9000), (0, 100), (20_000, 30_000), (9000, 21_000), (20_000, 30_000)]:
        digest.feed(start, memoryview(content)[start:end])
    assert digest.hexdigest() == hashlib.sha256(content).hexdigest()


def test_gaps_and_dropped_pieces_read_from_files(two_files: tuple[list[Path], bytes]) -> None:
    files, content = two_files
    # Pieces far ahead of the hashed position, with too little room to keep them all.
    digest = StreamingDigest(files, max_pending_bytes=10_000)
    for start in (100_000, 60_000, 90_000):
        digest.feed(start, memoryview(content)[start : start + 8_000])
    assert digest.hexdigest() == hashlib.sha256(content).hexdigest()


def test_feed_after_hexdigest_is_ignored(two_files: tuple[list[Path], bytes]) -> None:
    files, content = two_files
    digest = StreamingDigest(files)
    value = digest.hexdigest()
    digest.feed(0, memoryview(b"x" * 100))
    assert digest.hexdigest() == value == hashlib.sha256(content).hexdigest()


def test_hexdigest_is_remembered(two_files: tuple[list[Path], bytes], monkeypatch: pytest.MonkeyPatch) -> None:
    files, content = two_files
    expected = hashlib.sha256(content).hexdigest()
    assert cached_sha256(files) is None
    StreamingDigest(files).hexdigest()
    assert cached_sha256(files) == expected

    def no_hashing(*args: object) -> object:
        raise AssertionError("the files were hashed again")

    monkeypatch.setattr(hashing.hashlib, "sha256", no_hashing)
    assert files_sha256(files) == expected


def test_removed_file_keeps_digest(two_files: tuple[list[Path], bytes]) -> None:
    files, content = two_files
    digest = StreamingDigest(files)
    digest.feed(0, memoryview(content))
    files[1].unlink()
    # Every byte was read before the removal, so the value is right, but it is not cached.
    assert digest.hexdigest() == hashlib.sha256(content).hexdigest()
    assert hashing._read_cache() == {}


def test_removed_unread_file_reported(two_files: tuple[list[Path], bytes]) -> None:
    files, content = two_files
    digest = StreamingDigest(files)
    digest.feed(0, memoryview(content)[:1000])
    files[1].unlink()
    with pytest.raises(CheckpointError, match="b.bin: cannot read it to finish its SHA-256"):
        digest.hexdigest()


def test_checkpoint_digest_from_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    generator = torch.Generator().manual_seed(0)
    state = {f"layer.{index}": torch.randn(700, 500, generator=generator) for index in range(3)}
    state["small"] = torch.randn(10, generator=generator)
    path = tmp_path / "model.safetensors"
    save_file(state, str(path))
    checkpoint = Checkpoint.open(path)
    finish = checkpoint.start_sha256()
    # After every tensor is loaded, in any order, the digest has nothing left to read.
    read_ranges: list[tuple[int, int]] = []
    original = StreamingDigest._hash_from_files

    def counting(self: StreamingDigest, begin: int, end: int, view: memoryview) -> None:
        read_ranges.append((begin, end))
        original(self, begin, end, view)

    monkeypatch.setattr(StreamingDigest, "_hash_from_files", counting)
    for name in reversed(checkpoint.names):
        checkpoint.load(name)
    value = finish()
    checkpoint.close()
    assert value == hashlib.sha256(path.read_bytes()).hexdigest()
    assert read_ranges == []
    assert checkpoint.sha256() == value


def test_checkpoint_digest_known_costs_nothing(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    save_file({"w": torch.ones(4)}, str(path))
    expected = files_sha256([path])
    checkpoint = Checkpoint.open(path)
    assert checkpoint.start_sha256()() == expected


def test_merge_card_hashes_match_files(tiny_models: ModelFactory, tmp_path: Path) -> None:
    base, first, second = tiny_models(3)
    recipe = parse_recipe(
        {
            "merge_method": "ties",
            "base_model": str(base),
            "models": [{"model": str(first)}, {"model": str(second)}],
            "parameters": {"density": 0.5, "weight": 1.0},
        },
        source="test",
    )
    report = run_recipe(recipe, MergeOptions(output=tmp_path / "out"))
    for folder in (base, first, second):
        expected = hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()
        assert report.input_hashes[str(folder)] == expected
        assert cached_sha256([folder / "model.safetensors"]) == expected
