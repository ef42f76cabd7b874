"""Reading the start of a merge's inputs into the page cache while torch is imported."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from mergekit_ext.checkpoint.direct_read import MIN_DIRECT_BYTES
from mergekit_ext.checkpoint.warmup import start_warmup
from tests.foundation.test_direct_read import cached_bytes, evict, needs_direct, require_direct


def write_checkpoint(folder: Path, rows: int) -> Path:
    folder.mkdir()
    generator = torch.Generator().manual_seed(rows)
    save_file({"weight": torch.randn(rows, 1024, generator=generator)}, str(folder / "model.safetensors"))
    return folder / "model.safetensors"


@needs_direct
def test_warmup_caches_file_starts(tmp_path: Path) -> None:
    require_direct(tmp_path)
    files = [write_checkpoint(tmp_path / name, 1024) for name in ("base", "model")]
    for file in files:
        evict(file)
    # A folder and a lone file, 2 MB requested in all: the first MB of each file.
    thread = start_warmup([tmp_path / "base", files[1]], budget=2 * MIN_DIRECT_BYTES)
    assert thread is not None
    thread.join(timeout=60)
    for file in files:
        # The kernel reads in the background after the advice, so wait for the pages.
        deadline = time.monotonic() + 10
        while cached_bytes(file) < MIN_DIRECT_BYTES // 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        cached = cached_bytes(file)
        assert cached >= MIN_DIRECT_BYTES // 2
        # The rest of the 4 MB file stays on disk, apart from what the kernel reads ahead.
        assert cached < file.stat().st_size


def test_warmup_skips_what_it_cannot_read(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    (tmp_path / "empty").mkdir()
    inputs = [tmp_path / "missing", tmp_path / "notes.txt", tmp_path / "empty", "zoo:text/base"]
    assert start_warmup(inputs) is None
    assert start_warmup([write_checkpoint(tmp_path / "base", 8)], budget=0) is None


def test_warmup_module_imports_no_torch() -> None:
    # The command starts the warm-up before importing torch, so the module must not import it.
    program = "import sys, mergekit_ext.checkpoint.warmup; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
