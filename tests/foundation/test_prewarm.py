"""The prewarmer reads the start of the inputs in the engine's order, without torch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from mergekit_ext.checkpoint import prewarm


@pytest.fixture
def checkpoints(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """A sharded checkpoint (shards of 10 and 4 bytes) and a single-file one (8 bytes), in 4-byte chunks."""
    monkeypatch.setattr(prewarm, "CHUNK_BYTES", 4)
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    (sharded / "b.safetensors").write_bytes(b"B" * 4)
    (sharded / "a.safetensors").write_bytes(b"A" * 10)
    # The index puts b's tensor first, so b is read first although a sorts first.
    weight_map = {"first": "b.safetensors", "second": "a.safetensors"}
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    single = tmp_path / "single"
    single.mkdir()
    (single / "model.safetensors").write_bytes(b"S" * 8)
    return [sharded, single]


def test_read_order_interleaves_checkpoints(checkpoints: list[Path]) -> None:
    sharded, single = checkpoints
    reads = prewarm.read_order(prewarm.input_files(checkpoints), budget=1000)
    a, b, s = sharded / "a.safetensors", sharded / "b.safetensors", single / "model.safetensors"
    assert reads == [(b, 0, 4), (s, 0, 4), (a, 0, 4), (s, 4, 4), (a, 4, 4), (a, 8, 2)]


def test_read_order_stops_at_budget(checkpoints: list[Path]) -> None:
    sharded, single = checkpoints
    reads = prewarm.read_order(prewarm.input_files(checkpoints), budget=10)
    assert reads == [(sharded / "b.safetensors", 0, 4), (single / "model.safetensors", 0, 4),
                     (sharded / "a.safetensors", 0, 2)]


def test_prewarmer_reads_every_byte(checkpoints: list[Path]) -> None:
    prewarmer = prewarm.Prewarmer(checkpoints)
    prewarmer.run()
    assert prewarmer.bytes_read == 22


def test_prewarmer_stops_when_asked(checkpoints: list[Path]) -> None:
    prewarmer = prewarm.Prewarmer(checkpoints)
    prewarmer.stop()
    prewarmer.run()
    assert prewarmer.bytes_read == 0


def test_prewarmer_thread_ends_on_exit(checkpoints: list[Path]) -> None:
    with prewarm.Prewarmer(checkpoints):
        pass
    assert prewarm.THREAD_NAME not in [thread.name for thread in threading.enumerate()]


def test_prewarmer_respects_budget(checkpoints: list[Path]) -> None:
    prewarmer = prewarm.Prewarmer(checkpoints, budget=6)
    prewarmer.run()
    assert prewarmer.bytes_read == 6


def test_prewarmer_skips_bad_inputs(checkpoints: list[Path], tmp_path: Path) -> None:
    loose = tmp_path / "loose"
    loose.mkdir()
    (loose / "x.safetensors").write_bytes(b"X" * 4)
    (loose / "y.safetensors").write_bytes(b"Y" * 4)
    pickled = tmp_path / "pytorch_model.bin"
    pickled.write_bytes(b"P" * 4)
    paths = [tmp_path / "missing", loose, pickled, *checkpoints]
    # Two loose files without an index, a missing folder and a pickle are left to the engine.
    assert prewarm.input_files(paths) == prewarm.input_files(checkpoints)
    prewarmer = prewarm.Prewarmer(paths)
    prewarmer.run()
    assert prewarmer.bytes_read == 22


def test_prewarmer_skips_named_pipe(tmp_path: Path) -> None:
    # Opening a pipe for reading waits for a writer. A pipe's size is 0, so it is never opened.
    folder = tmp_path / "pipe"
    folder.mkdir()
    os.mkfifo(folder / "model.safetensors")
    prewarmer = prewarm.Prewarmer([folder], budget=1 << 20)
    prewarmer.run()
    assert prewarmer.bytes_read == 0


def test_prewarm_does_not_import_torch() -> None:
    # The CLI starts the prewarmer before torch is imported, so the module must not import it.
    program = "import sys, mergekit_ext.checkpoint.prewarm; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
