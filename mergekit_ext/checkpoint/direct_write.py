"""New files written in order with O_DIRECT, so the output skips the page cache.

A merge writes each output byte once and does not read it back, so copying it into the
page cache gains nothing. On the development machine (a 2-core virtual machine) that
copy was the largest single kernel cost of a merge. It took 11% of the CPU samples of
a profiled TIES merge of Qwen2-0.5B shapes, about 1.3 s for its 0.99 GB output, because
every page-cache page was new memory. `dd` wrote 1 GB with O_DIRECT in 0.55 to 0.61 s
and 0.1 to 0.2 s of system time, and with buffered writes to new pages in 2.45 s of
system time. With O_DIRECT output, TIES of the benchmark's inputs (4 bf16 models and a
base, page cache dropped) took 7.75 to 8.31 s against 9.13 to 9.40 s, run alternately.

`ShardFile` copies bytes written right after the ones it has into a page-aligned
staging buffer, and writes each full buffer with O_DIRECT. O_DIRECT needs the buffer
address, file offset and length aligned to the device's block size. The last partial
block is padded with zeros for its write, and the file is then cut to its size. A
write anywhere else (the writer's API allows any order), a system without O_DIRECT, a
file system that rejects it, or a file smaller than `MIN_DIRECT_BYTES` uses buffered
writes from then on.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
from pathlib import Path

import numpy as np

from mergekit_ext.checkpoint.direct_read import ALIGNMENT

logger = logging.getLogger(__name__)

# Bytes staged before each O_DIRECT write, a multiple of ALIGNMENT.
STAGE_BYTES = 8 << 20
# Smaller files are written buffered: the staging buffer would be most of their cost.
MIN_DIRECT_BYTES = 1 << 20
_DIRECT_FLAG = getattr(os, "O_DIRECT", 0)


class ShardFile:
    """A new file of `size` bytes, written by offset. Writes in file order go through O_DIRECT.

    Not safe for concurrent use: one thread writes a file at a time.
    """

    def __init__(self, path: Path, size: int, *, direct: bool = True) -> None:
        self.path = path
        self.size = size
        self.descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self._direct_descriptor: int | None = None
        self._stage: mmap.mmap | None = None
        self._staged = np.empty(0, dtype=np.uint8)
        # File offset of the staging buffer's first byte (aligned), and the bytes staged.
        self._stage_offset = 0
        self._fill = 0
        self._end = 0
        if direct and _DIRECT_FLAG and size >= MIN_DIRECT_BYTES:
            self._start_direct()

    @property
    def direct(self) -> bool:
        """True while in-order writes go through O_DIRECT."""
        return self._stage is not None

    def write_at(self, offset: int, data: np.ndarray) -> None:
        """Write the bytes of a contiguous uint8 array at `offset`."""
        self._end = max(self._end, offset + data.size)
        if self._stage is not None and offset == self._stage_offset + self._fill:
            staged = self._append(data)
            offset += staged
            data = data[staged:]
            if not data.size:
                return
        self._stop_direct()
        _pwrite_all(self.descriptor, memoryview(data), offset)

    def close(self) -> None:
        """Write the staged tail, cut the file to its size and close it."""
        try:
            if self._stage is not None and self._fill:
                padded = -(-self._fill // ALIGNMENT) * ALIGNMENT
                self._staged[self._fill : padded] = 0
                self._write_stage(padded)
            # The padded tail may reach past the last byte written.
            os.ftruncate(self.descriptor, self._end)
        finally:
            self.abort()

    def abort(self) -> None:
        """Close the file without writing what is staged."""
        self._release_direct()
        if self.descriptor >= 0:
            os.close(self.descriptor)
            self.descriptor = -1

    def _start_direct(self) -> None:
        try:
            self._direct_descriptor = os.open(self.path, os.O_WRONLY | _DIRECT_FLAG)
        except OSError as error:
            logger.debug("O_DIRECT is not available for %s (%s); writing through the page cache", self.path, error)
            return
        # An anonymous mapping starts on a page boundary, as O_DIRECT needs.
        self._stage = mmap.mmap(-1, STAGE_BYTES, flags=mmap.MAP_PRIVATE)
        self._staged = np.frombuffer(self._stage, dtype=np.uint8)

    def _append(self, data: np.ndarray) -> int:
        """Copy `data` into the staging buffer and write each full buffer.

        Returns the number of bytes staged, which is less than `data.size` only when a
        write with O_DIRECT failed and buffered writes took over.
        """
        staged = 0
        while staged < data.size and self._stage is not None:
            count = min(data.size - staged, STAGE_BYTES - self._fill)
            # numpy copies without holding the GIL, so merges go on meanwhile.
            np.copyto(self._staged[self._fill : self._fill + count], data[staged : staged + count])
            self._fill += count
            staged += count
            if self._fill == STAGE_BYTES:
                self._write_stage(STAGE_BYTES)
        return staged

    def _write_stage(self, length: int) -> None:
        """Write the first `length` staged bytes (a multiple of ALIGNMENT) at the staging offset."""
        assert self._direct_descriptor is not None
        written = 0
        try:
            while written < length:
                count = os.pwrite(self._direct_descriptor, self._staged[written:length], self._stage_offset + written)
                written += count
                if count == 0 or count % ALIGNMENT:
                    # A short write leaves an unaligned rest, which a buffered write finishes.
                    break
        except OSError as error:
            if error.errno != errno.EINVAL:
                raise
            # EINVAL most likely means the device needs a larger alignment than ALIGNMENT.
            logger.debug("O_DIRECT write to %s failed (%s); writing through the page cache", self.path, error)
        if written < length:
            _pwrite_all(self.descriptor, memoryview(self._staged[written:length]), self._stage_offset + written)
            self._release_direct()
        self._stage_offset += length
        self._fill = 0

    def _stop_direct(self) -> None:
        """Write what is staged with a buffered write and use buffered writes from now on."""
        if self._stage is None:
            return
        if self._fill:
            _pwrite_all(self.descriptor, memoryview(self._staged[: self._fill]), self._stage_offset)
        self._fill = 0
        self._release_direct()

    def _release_direct(self) -> None:
        # Dropping the references unmaps the buffer. mmap.close would fail while a
        # view of it lives on, for example in the traceback of a failed write.
        self._staged = np.empty(0, dtype=np.uint8)
        self._stage = None
        if self._direct_descriptor is not None:
            os.close(self._direct_descriptor)
            self._direct_descriptor = None


def _pwrite_all(descriptor: int, view: memoryview, offset: int) -> None:
    done = 0
    while done < len(view):
        count = os.pwrite(descriptor, view[done:], offset + done)
        if count == 0:
            raise OSError(errno.EIO, "the file system accepted no bytes")
        done += count
