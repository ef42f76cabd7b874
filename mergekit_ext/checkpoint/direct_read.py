"""Reads of large tensors that skip the page cache where the data is not cached yet.

A merge reads every input once, so copying it through the page cache gains nothing,
and on the development machine (a 2-core virtual machine) filling the page cache was
the largest CPU cost of a merge. Reading the 4.94 GB benchmark inputs (a base and 4
Qwen2-0.5B-shaped bf16 checkpoints) from a dropped page cache took 4.4 to 5.8 s of
wall time and 4.5 to 7.1 s of system time with buffered reads on 4 threads. With
O_DIRECT reads into reused 8 MB buffers on one thread it took 2.8 to 3.1 s of wall
time and 0.1 s of system time.

`RawFile.read` therefore reads a range of at least `MIN_DIRECT_BYTES` with O_DIRECT,
unless the whole range is in the page cache (`mincore` on a mapping of the file), which
a buffered read then copies at memory speed. Small ranges, systems without O_DIRECT
and file systems that reject it (tmpfs on older kernels, some network file systems) use
buffered reads.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import mmap
import os
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from mergekit_ext.checkpoint.hashing import StreamingDigest
from mergekit_ext.errors import CheckpointError

if TYPE_CHECKING:
    import torch

    from mergekit_ext.checkpoint.head_start import FileHeadStart

logger = logging.getLogger(__name__)

# O_DIRECT needs the buffer address, file offset and length aligned to the device's
# logical block size: 512 or 4096 bytes on common disks, so 4096 suits both.
ALIGNMENT = 4096
MIN_DIRECT_BYTES = 1 << 20
MAX_REQUEST_BYTES = 64 << 20
PAGE_SIZE = mmap.PAGESIZE


def _load_libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte)]
    except (OSError, AttributeError):
        return None
    return libc


_LIBC = _load_libc()
_MAP_FAILED = ctypes.c_void_p(-1).value
_DIRECT_FLAG = getattr(os, "O_DIRECT", 0)
_LOWEST_BIT = bytes(value & 1 for value in range(256))


def aligned_start(offset: int, address: int) -> int:
    """Return where in a buffer at `address` the byte at file `offset` goes, so aligned offsets land on aligned addresses.

    The buffer needs `3 * ALIGNMENT` bytes more than the data: the reads start and end
    on aligned file offsets, before and after the data.
    """
    return ALIGNMENT + (offset - address) % ALIGNMENT


class RawFile:
    """An open safetensors file read by byte range, safe to use from several threads.

    A `head_start` (see head_start), where given, serves the ranges it has read ahead.
    """

    def __init__(self, path: Path, *, direct: bool = True, head_start: FileHeadStart | None = None) -> None:
        self.path = path
        self.head_start = head_start
        self.descriptor = os.open(path, os.O_RDONLY)
        self.size = os.fstat(self.descriptor).st_size
        self._lock = threading.Lock()
        self._direct_descriptor: int | None = None
        self._direct_enabled = direct and bool(_DIRECT_FLAG) and _LIBC is not None and self.size > 0
        self._map_address: int | None = None
        # A digest fed with every range read, and this file's position in its input.
        self.digest: tuple[StreamingDigest, int] | None = None
        self._advise_read_ahead()

    def read(self, offset: int, nbytes: int, description: str) -> torch.Tensor:
        """Read `nbytes` bytes at `offset` into a new uint8 tensor.

        `description` names the bytes in errors. The tensor's data starts at the same offset modulo `ALIGNMENT` as the bytes in the
        file, so a caller viewing it as a wider dtype needs a suitably aligned `offset`.
        """
        import torch  # here, so that a head start (see head_start) can read before torch loads

        served = self.head_start.take(offset, nbytes) if self.head_start is not None else None
        if served is not None:
            buffer, start = served
            data = torch.frombuffer(buffer, dtype=torch.uint8, count=nbytes, offset=start)
        elif nbytes < MIN_DIRECT_BYTES or not self._direct_ready():
            data = self._read_buffered(offset, nbytes, description)
        else:
            # Place the data so that every aligned file offset lands at an aligned address.
            storage = torch.empty(nbytes + 3 * ALIGNMENT, dtype=torch.uint8)
            start = aligned_start(offset, storage.data_ptr())
            self.read_into(memoryview(storage.numpy()), start, offset, nbytes, description)
            data = storage[start : start + nbytes]
        self._feed_digest(offset, data)
        return data

    def read_into(self, view: memoryview, start: int, offset: int, nbytes: int, description: str) -> None:
        """Read `nbytes` bytes at `offset` into `view[start:]`, with O_DIRECT where it applies.

        `view` must leave room for aligned reads: `start` as `aligned_start` places it, and
        at least `2 * ALIGNMENT` bytes after the data.
        """
        if nbytes < MIN_DIRECT_BYTES or not self._direct_ready() or self._cached_bytes(offset, nbytes) == nbytes:
            self._pread_all(self.descriptor, view, start, offset, nbytes, description)
        else:
            # A partly cached range is read whole with O_DIRECT. A buffered copy of its
            # cached part could reach a page that another reader's read-ahead marked.
            # Linux then reads the next window ahead even with POSIX_FADV_RANDOM (seen on
            # 6.18), and each range would leave the next one partly cached.
            self._read_direct(view, start, offset, offset + nbytes, description)

    def _advise_read_ahead(self) -> None:
        """Set the kernel's read-ahead for the buffered descriptor.

        While O_DIRECT reads the large ranges, the buffered reads are the small tensors
        between them. Read-ahead after each one (8 MB on the development VM, and Linux
        doubles it for sequential advice) would cache the large ranges that follow.
        `_cached_bytes` would then find them cached, their buffered copies would trigger
        more read-ahead, and the merge would read through the page cache after all. So
        read-ahead is off while O_DIRECT is in use, and doubled when every read is buffered.
        """
        if hasattr(os, "posix_fadvise"):
            advice = os.POSIX_FADV_RANDOM if self._direct_enabled else os.POSIX_FADV_SEQUENTIAL
            os.posix_fadvise(self.descriptor, 0, 0, advice)

    def _stop_direct(self) -> None:
        self._direct_enabled = False
        self._advise_read_ahead()

    def _feed_digest(self, offset: int, data: torch.Tensor) -> None:
        if self.digest is not None and data.numel():
            digest, file_start = self.digest
            digest.feed(file_start + offset, memoryview(data.numpy()))

    def close(self) -> None:
        """Close the descriptors and the residency mapping."""
        with self._lock:
            if self._map_address is not None and _LIBC is not None:
                _LIBC.munmap(self._map_address, self.size)
                self._map_address = None
            if self._direct_descriptor is not None:
                os.close(self._direct_descriptor)
                self._direct_descriptor = None
            self._direct_enabled = False
        os.close(self.descriptor)

    def _direct_ready(self) -> bool:
        if not self._direct_enabled:
            return False
        with self._lock:
            if self._direct_descriptor is not None:
                return True
            if not self._direct_enabled:
                return False
            try:
                self._direct_descriptor = os.open(self.path, os.O_RDONLY | _DIRECT_FLAG)
            except OSError as error:
                logger.debug("O_DIRECT is not available for %s (%s); reading through the page cache", self.path, error)
                self._stop_direct()
                return False
            address = _LIBC.mmap(None, self.size, mmap.PROT_READ, mmap.MAP_SHARED, self.descriptor, 0)
            if address is None or address == _MAP_FAILED:
                logger.debug("could not map %s to check its page cache residency", self.path)
                os.close(self._direct_descriptor)
                self._direct_descriptor = None
                self._stop_direct()
                return False
            self._map_address = address
            return True

    def _cached_bytes(self, offset: int, nbytes: int) -> int:
        """Return how many bytes from `offset` on are in the page cache, in whole pages."""
        assert _LIBC is not None
        assert self._map_address is not None
        first_page = offset // PAGE_SIZE
        end_page = min(-(-(offset + nbytes) // PAGE_SIZE), -(-self.size // PAGE_SIZE))
        pages = end_page - first_page
        if pages <= 0:
            return 0
        residency = (ctypes.c_ubyte * pages)()
        if _LIBC.mincore(self._map_address + first_page * PAGE_SIZE, pages * PAGE_SIZE, residency) != 0:
            return 0
        # Only the lowest bit of each byte is defined, and it is 1 when the page is resident.
        flags = bytes(residency).translate(_LOWEST_BIT)
        missing = flags.find(b"\x00")
        if missing < 0:
            missing = pages
        return max(0, min(nbytes, (first_page + missing) * PAGE_SIZE - offset))

    def _read_direct(self, view: memoryview, start: int, origin: int, end: int, description: str) -> None:
        """Read file bytes [origin, end) with O_DIRECT into `view`, with file offset `origin` at `start`."""
        assert self._direct_descriptor is not None
        position = origin - origin % ALIGNMENT
        while position < end:
            length = min(MAX_REQUEST_BYTES, -(-(end - position) // ALIGNMENT) * ALIGNMENT)
            target = start + (position - origin)
            try:
                count = os.preadv(self._direct_descriptor, [view[target : target + length]], position)
            except OSError as error:
                if error.errno != errno.EINVAL:
                    raise
                # EINVAL here most likely means the device needs a larger alignment than
                # ALIGNMENT, so read the rest buffered.
                logger.debug("O_DIRECT read of %s failed (%s); reading through the page cache", self.path, error)
                self._stop_direct()
                self._pread_all(self.descriptor, view, target, position, end - position, description)
                return
            if count == 0:
                raise self._truncated(description)
            position += count
            if position % ALIGNMENT and position < end:
                # A short read mid-file leaves an unaligned position, so read the rest buffered.
                self._pread_all(self.descriptor, view, start + (position - origin), position, end - position, description)
                return

    def _read_buffered(self, offset: int, nbytes: int, description: str) -> torch.Tensor:
        import torch

        # torch.empty skips the zero fill a bytearray would do: every byte is read over anyway.
        buffer = torch.empty(nbytes, dtype=torch.uint8)
        if nbytes:
            self._pread_all(self.descriptor, memoryview(buffer.numpy()), 0, offset, nbytes, description)
        return buffer

    def _pread_all(self, descriptor: int, view: memoryview, target: int, offset: int, nbytes: int, description: str) -> None:
        done = 0
        while done < nbytes:
            # pread is safe from several threads at once: it does not move a shared offset.
            count = os.preadv(descriptor, [view[target + done : target + nbytes]], offset + done)
            if count == 0:
                raise self._truncated(description)
            done += count

    def _truncated(self, description: str) -> CheckpointError:
        return CheckpointError(f"{self.path}: file is truncated: {description} ends past the end of the file")
