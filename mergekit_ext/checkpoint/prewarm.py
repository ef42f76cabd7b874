"""Read the start of a merge's inputs on a spare core while the CLI imports torch.

The `merge` command spends its first 1.3 to 1.7 s importing torch, numba and the
engine on one core, before the first tensor is read. `Prewarmer` reads the inputs in
that time, in the order the engine will: chunk by chunk, each chunk from every input
in turn. From a cold disk this starts the I/O earlier. On the development machine the
first read of a file also costs far more CPU time than later ones: `cat` of the 4.94 GB
benchmark inputs took 2.4 to 2.8 s of system time from a dropped page cache and 0.4 s
once they were cached. The prewarmer pays that first read on the idle core. The bytes
land in a small reused buffer and stay only in the page cache.

Measured on the development machine from a dropped page cache, on the benchmark's
inputs (a base and 4 Qwen2-0.5B-shaped bf16 checkpoints): task arithmetic took 8.00 to
8.28 s against 8.26 to 8.78 s without the prewarmer (four runs each), and TIES 12.08 to
13.24 s against 13.72 to 15.49 s (three runs each).

This module does not import torch. Every error only ends the prewarming, since the
engine reads and checks the same files.
"""

from __future__ import annotations

import logging
import mmap
import os
import threading
from collections.abc import Sequence
from pathlib import Path

from mergekit_ext.checkpoint.layout import safetensors_files
from mergekit_ext.errors import CheckpointError

logger = logging.getLogger(__name__)

CHUNK_BYTES = 1 << 20
THREAD_NAME = "mergekit-ext-prewarm"
# Share of the memory the system reports available that prewarming may fill.
MEMORY_SHARE = 0.25


def input_files(paths: Sequence[Path]) -> list[list[Path]]:
    """Return the safetensors files of each checkpoint path (folder or file) that has any."""
    checkpoints = []
    for path in paths:
        try:
            if path.is_file():
                files = [path] if path.suffix == ".safetensors" else []
            else:
                files = safetensors_files(path) if path.is_dir() else []
        except (CheckpointError, OSError) as error:  # the engine reports a broken checkpoint itself
            logger.debug("not prewarming %s: %s", path, error)
            continue
        if files:
            checkpoints.append(files)
    return checkpoints


def read_order(checkpoints: Sequence[Sequence[Path]], budget: int) -> list[tuple[Path, int, int]]:
    """Return (file, offset, length) reads of at most `budget` bytes in all, chunk by chunk across the checkpoints.

    Each checkpoint's files are read as one stream, so the n-th chunk of every
    checkpoint comes before any (n+1)-th chunk, as the engine reads a tensor from
    every input before the next.
    """
    streams = [[(file, file.stat().st_size) for file in files] for files in checkpoints]
    positions = [(0, 0) for _ in streams]  # (file index, offset) per stream
    reads: list[tuple[Path, int, int]] = []
    planned = 0
    while planned < budget:
        progressed = False
        for number, stream in enumerate(streams):
            file_index, offset = positions[number]
            while file_index < len(stream) and offset >= stream[file_index][1]:
                file_index, offset = file_index + 1, 0
            if file_index == len(stream) or planned >= budget:
                positions[number] = (file_index, offset)
                continue
            file, size = stream[file_index]
            length = min(CHUNK_BYTES, size - offset, budget - planned)
            reads.append((file, offset, length))
            planned += length
            positions[number] = (file_index, offset + length)
            progressed = True
        if not progressed:
            break
    return reads


def memory_budget() -> int:
    """Return MEMORY_SHARE of the memory the system reports available, or 1 GB where it reports none."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(int(line.split()[1]) * 1024 * MEMORY_SHARE)
    except (OSError, ValueError, IndexError):
        pass
    return 1 << 30


class Prewarmer:
    """A background thread that reads the start of the inputs until `stop` or the budget.

    Use as a context manager around the imports: it starts on entry and stops on exit.
    """

    def __init__(self, paths: Sequence[Path], budget: int | None = None) -> None:
        self._paths = list(paths)
        self._budget = memory_budget() if budget is None else budget
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self.run, name=THREAD_NAME, daemon=True)
        self.bytes_read = 0

    def __enter__(self) -> Prewarmer:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def stop(self) -> None:
        """Stop reading and wait for the thread, which finishes its current chunk first."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def run(self) -> None:
        """Read the planned chunks in the calling thread until `stop` or the end (the thread's target)."""
        buffer = mmap.mmap(-1, CHUNK_BYTES)
        view = memoryview(buffer)
        descriptors: dict[Path, int] = {}
        try:
            for file, offset, length in read_order(input_files(self._paths), self._budget):
                if self._stop.is_set():
                    break
                if file not in descriptors:
                    descriptors[file] = os.open(file, os.O_RDONLY)
                self.bytes_read += os.preadv(descriptors[file], [view[:length]], offset)
        except OSError as error:
            logger.debug("prewarming stopped: %s", error)
        finally:
            for descriptor in descriptors.values():
                os.close(descriptor)
            view.release()
            buffer.close()
