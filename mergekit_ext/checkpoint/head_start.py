"""Reading the first tensors of a merge while the merge code is still being imported.

The `merge` command spends over a second importing torch and the merge code before
its first read, and the disk idles meanwhile. A `HeadStart` reads the first tensors
of every input, in the reference model's order, on a thread of its own, into buffers
that the merge's reads then take (`RawFile.read`) instead of reading those bytes
again. It needs only the safetensors headers and the standard library, so it starts
before torch is imported.

Each tensor of 1 MB or more of each input is one region. Smaller tensors are left to
the merge, whose buffered reads of them cost little. A region's buffer is handed out
as the merge requests its bytes, whole or in row blocks, and the head start drops it
once every byte has been handed out. Row blocks taken from a buffer keep all of it in
memory until the last of them is freed. A merge of row blocks (task arithmetic,
linear) therefore holds up to the whole budget at first, about 1 GB more peak memory
than without a head start. A read that fails, or a range no region covers, leaves the merge
to read those bytes as it would without a head start, and to report any fault in the
file itself.
"""

from __future__ import annotations

import logging
import mmap
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from mergekit_ext.checkpoint.direct_read import ALIGNMENT, MAX_REQUEST_BYTES, MIN_DIRECT_BYTES, RawFile, aligned_start
from mergekit_ext.checkpoint.layout import safetensors_files
from mergekit_ext.checkpoint.safetensors_header import read_header

logger = logging.getLogger(__name__)

# Bytes read ahead in all: the merge's own read-ahead window (MergeOptions.prefetch_bytes).
DEFAULT_BUDGET = 1 << 30


@dataclass
class _Region:
    """One tensor's bytes in one file, read ahead into `buffer` from `start` on."""

    file: Path
    offset: int
    nbytes: int
    description: str
    target: int  # bytes to read from `offset` on: the budget's share, or more once requested
    buffer: mmap.mmap | None = None
    start: int = 0
    filled: int = 0  # bytes read from `offset` on
    handed_out: int = 0  # bytes handed out
    done: bool = False  # read to the end, failed, or stopped

    def holds(self, offset: int, nbytes: int) -> bool:
        """Return True for a range inside this tensor that starts in the part read ahead."""
        return self.offset <= offset < self.offset + self.target and offset + nbytes <= self.offset + self.nbytes


@dataclass
class FileHeadStart:
    """The regions of one file, as its `RawFile` uses them."""

    owner: HeadStart
    regions: list[_Region] = field(default_factory=list)

    def take(self, offset: int, nbytes: int) -> tuple[mmap.mmap, int] | None:
        """Return the buffer holding bytes [offset, offset + nbytes) of the file and where they start in it.

        A range that starts in the part read ahead is read to its end, and the call
        waits for that. Returns None when no region contains the range, or when its read
        failed or was stopped: the caller reads those bytes itself.
        """
        return self.owner.take(self, offset, nbytes)


class HeadStart:
    """Reads the first tensors of several safetensors checkpoints on a thread, for a merge to take.

    Use it as a context manager, or call `close`, which stops the thread.
    """

    def __init__(self, regions: Sequence[_Region]) -> None:
        self._regions = list(regions)
        self._files: dict[Path, FileHeadStart] = {}
        for region in self._regions:
            self._files.setdefault(region.file, FileHeadStart(self)).regions.append(region)
        self._condition = threading.Condition()
        self._stopped = False
        # Regions are read in order from `_cursor` on. Regions requested past their target
        # wait in `_extended`. So finding the next region needs no scan of all of them.
        self._cursor = 0
        self._extended: list[_Region] = []
        self._thread = threading.Thread(target=self._read_all, name="mergekit-ext-head-start", daemon=True)

    @classmethod
    def begin(cls, checkpoints: Sequence[Path], budget: int = DEFAULT_BUDGET) -> HeadStart | None:
        """Start reading the first `budget` bytes of the tensors of `checkpoints` (folders or .safetensors files).

        Tensors of MIN_DIRECT_BYTES or more are taken in the order of the first checkpoint
        (the merge's reference: the base model, or else the first model), each from every
        checkpoint that has it.
        The last tensor may be read in part. When a merge requests all of it, as TIES
        requests whole tensors, the rest is read then. Returns None where nothing can be read
        ahead: a checkpoint that is missing, pickled or malformed is left to the merge,
        which reports it.
        """
        try:
            headers = [_tensor_ranges(Path(path)) for path in checkpoints]
        except Exception as error:  # noqa: BLE001 - the merge reports every fault of its inputs
            logger.debug("no head start: %s", error)
            return None
        regions: list[_Region] = []
        left = budget
        for name in headers[0] if headers else {}:
            for ranges in headers:
                if name in ranges and left > 0 and ranges[name][2] >= MIN_DIRECT_BYTES:
                    file, offset, nbytes = ranges[name]
                    regions.append(_Region(file, offset, nbytes, f"tensor {name!r}", target=min(nbytes, left)))
                    left -= nbytes
            if left <= 0:
                break
        if not regions:
            return None
        head_start = cls(regions)
        head_start.start()
        logger.debug("head start: reading %d bytes of %d tensors", budget - max(left, 0), len(regions))
        return head_start

    def start(self) -> None:
        """Start the reading thread (`begin` does)."""
        self._thread.start()

    def __enter__(self) -> HeadStart:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def for_file(self, file: Path) -> FileHeadStart | None:
        """Return the regions of `file` (any path to the same file), or None when it has none."""
        try:
            return self._files.get(file.resolve())
        except OSError:
            return None

    def take(self, file_regions: FileHeadStart, offset: int, nbytes: int) -> tuple[mmap.mmap, int] | None:
        """See `FileHeadStart.take`."""
        with self._condition:
            region = next((r for r in file_regions.regions if r.holds(offset, nbytes)), None)
            if region is None:
                return None
            needed = offset + nbytes - region.offset
            if needed > region.target:
                region.target = needed
                self._extended.append(region)
                self._condition.notify_all()
            while region.filled < needed and not region.done:
                self._condition.wait()
            if region.filled < needed or region.buffer is None:
                return None
            buffer, start = region.buffer, region.start + (offset - region.offset)
            region.handed_out += nbytes
            if region.handed_out >= region.target:
                # All of it was handed out: the views taken keep the buffer alive as long as they need it.
                file_regions.regions.remove(region)
                region.buffer = None
            return buffer, start

    def close(self) -> None:
        """Stop reading and drop the regions not handed out. Views already taken stay valid."""
        with self._condition:
            self._stopped = True
            for file_regions in self._files.values():
                for region in file_regions.regions:
                    region.buffer = None
                    region.done = True
                file_regions.regions.clear()
            self._condition.notify_all()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join()

    def _read_all(self) -> None:
        started = time.perf_counter()
        handles: dict[Path, RawFile] = {}
        try:
            while True:
                with self._condition:
                    region = self._next_region()
                    if region is None:
                        if started:
                            logger.debug("head start: read ahead in %.2f s", time.perf_counter() - started)
                            started = 0.0
                        # Every requested byte is read: wait for more requests, or for `close`.
                        while not self._stopped and (region := self._next_region()) is None:
                            self._condition.wait()
                        if region is None:
                            return
                handle = handles.get(region.file)
                if handle is None:
                    try:
                        handle = handles[region.file] = RawFile(region.file)
                    except OSError as error:  # removed or unreadable since its header was read
                        logger.debug("head start: cannot open %s: %s", region.file, error)
                        with self._condition:
                            region.done = True
                            self._condition.notify_all()
                        continue
                self._read_piece(handle, region)
        finally:
            for handle in handles.values():
                handle.close()
            with self._condition:
                for region in self._regions:
                    region.done = True
                self._condition.notify_all()

    def _next_region(self) -> _Region | None:
        """Return the next region with bytes to read, or None (call with the lock held)."""
        if self._stopped:
            return None
        while self._extended:
            region = self._extended[0]
            if region.filled < region.target and not region.done:
                return region
            self._extended.pop(0)
        while self._cursor < len(self._regions):
            region = self._regions[self._cursor]
            if region.filled < region.target and not region.done:
                return region
            self._cursor += 1
        return None

    def _read_piece(self, handle: RawFile, region: _Region) -> None:
        """Read the next piece of `region`: up to MAX_REQUEST_BYTES, ending on an aligned file offset."""
        if region.buffer is None:
            try:
                # Page-aligned, filled as read. Private, because a shared anonymous mapping is
                # backed by shmem, whose first touch cost 0.43 s per GB against 0.35 s on the benchmark VM.
                buffer = mmap.mmap(-1, region.nbytes + 3 * ALIGNMENT, flags=mmap.MAP_PRIVATE)
            except OSError as error:  # out of address space: the merge reads this tensor itself
                logger.debug("head start: no buffer for %s of %s: %s", region.description, region.file, error)
                with self._condition:
                    region.done = True
                    self._condition.notify_all()
                return
            with self._condition:
                if region.done:
                    return
                region.buffer, region.start = buffer, aligned_start(region.offset, 0)
        buffer, start, filled = region.buffer, region.start, region.filled
        # Pieces end on aligned offsets, so every piece after the first starts on one. The
        # last piece ends at the target rounded up to the alignment, not at a full piece.
        read_end = min(region.nbytes, -(-(region.offset + region.target) // ALIGNMENT) * ALIGNMENT - region.offset)
        end = min(read_end, (region.offset + filled + MAX_REQUEST_BYTES) // ALIGNMENT * ALIGNMENT - region.offset)
        try:
            with memoryview(buffer) as view:
                handle.read_into(view, start + filled, region.offset + filled, end - filled, region.description)
        except Exception as error:  # noqa: BLE001 - the merge reads these bytes itself and reports the fault
            logger.debug("head start: reading %s of %s failed: %s", region.description, region.file, error)
            end = filled
        with self._condition:
            region.filled = end
            region.done = region.done or end == filled or end == region.nbytes
            self._condition.notify_all()


def _tensor_ranges(checkpoint: Path) -> dict[str, tuple[Path, int, int]]:
    """Return each tensor's file, offset and size in a safetensors checkpoint, in file and offset order.

    The order is `Checkpoint`'s, which the merge follows: the files as listed, each by offset.
    """
    files = [checkpoint] if checkpoint.is_file() else safetensors_files(checkpoint)
    if not files:
        raise FileNotFoundError(f"{checkpoint}: no safetensors files")
    ranges = {}
    for file in files:
        header = read_header(file)
        resolved = file.resolve()
        for entry in sorted(header.entries.values(), key=lambda entry: entry.begin):
            if entry.nbytes > 0:
                ranges[entry.name] = (resolved, header.data_start + entry.begin, entry.nbytes)
    return ranges
