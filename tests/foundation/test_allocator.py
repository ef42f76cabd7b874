"""keep_freed_memory: large freed blocks are reused instead of mapped afresh."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

# Allocates and fills twenty 64 MB buffers one after another, in the main thread or in
# another one, and prints the page faults.
PROGRAM = """
import resource, sys, threading
from mergekit_ext.allocator import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
def allocate():
    for _ in range(20):
        block = bytearray(64 << 20)
        del block
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
if sys.argv[2] == "thread":
    worker = threading.Thread(target=allocate)
    worker.start()
    worker.join()
else:
    allocate()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def faults(mode: str, where: str = "main") -> int:
    result = subprocess.run([sys.executable, "-c", PROGRAM, mode, where], capture_output=True, text=True, check=True)
    return int(result.stdout)


@pytest.mark.skipif(not (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc"), reason="needs glibc's malloc")
def test_freed_blocks_are_reused() -> None:
    pages = 20 * (64 << 20) // 4096
    # Without the setting, every buffer is a new mapping whose pages all fault in.
    # With it, the other nineteen buffers reuse the first one's pages.
    assert faults("default") > 0.9 * pages
    assert faults("keep") < 0.2 * pages


@pytest.mark.skipif(not (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc"), reason="needs glibc's malloc")
def test_freed_blocks_are_reused_in_other_threads() -> None:
    # A thread's own arena serves blocks larger than its 64 MB heaps with new mappings,
    # so the setting must also put every thread on the main arena.
    pages = 20 * (64 << 20) // 4096
    assert faults("default", "thread") > 0.9 * pages
    assert faults("keep", "thread") < 0.2 * pages
