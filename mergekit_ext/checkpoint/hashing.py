"""SHA-256 of checkpoint weight files, remembered across runs.

Hashing costs a full read of every input and about 0.55 s of CPU time per GB (hashlib
ran at 1.8 GB/s on the 2-core development machine), a large share of a merge there.
The digest of a set of files is therefore stored in `<cache root>/sha256.json` under
the files' identity: path, device, inode, size, modification time and change time, in
nanoseconds. Writing to a file changes its modification and change times, and the
change time cannot be set back from user space, so an edited file is hashed again.
A merge also saves the read of new inputs, because `StreamingDigest` hashes the bytes
the merge reads anyway.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import logging
import os
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path

from mergekit_ext.cache import cache_root
from mergekit_ext.errors import CheckpointError

logger = logging.getLogger(__name__)

HASH_BLOCK_BYTES = 4 * 1024 * 1024
CACHE_FILE = "sha256.json"
MAX_ENTRIES = 2000

_lock = threading.Lock()


def files_sha256(files: Sequence[Path]) -> str:
    """SHA-256 of the files' bytes concatenated in order, from the cache when unchanged."""
    known = cached_sha256(files)
    if known is not None:
        return known
    return StreamingDigest(files).hexdigest()


def cached_sha256(files: Sequence[Path]) -> str | None:
    """Return the remembered SHA-256 of `files`, or None when they are new or changed."""
    key = _identity(files)
    with _lock:
        return _read_cache().get(key)


class StreamingDigest:
    """SHA-256 of files concatenated in order, fed by the reads a merge makes anyway.

    A merge reads every byte of its inputs' tensors. `feed` hashes those bytes as they
    arrive, so the digest costs no second read of the files. Bytes that arrive ahead of
    the hashed position are copied and kept, up to `max_pending_bytes`. `hexdigest`
    reads whatever was not fed (headers, tensors the merge skipped, dropped pieces)
    and remembers the result for `files_sha256`.
    """

    def __init__(self, files: Sequence[Path], max_pending_bytes: int = 32 * 1024 * 1024) -> None:
        self.files = list(files)
        self._key = _identity(self.files)
        self._sizes = [os.stat(file).st_size for file in self.files]
        self._starts = [sum(self._sizes[:index]) for index in range(len(self.files))]
        self.total_bytes = sum(self._sizes)
        self._max_pending_bytes = max_pending_bytes
        self._digest = hashlib.sha256()
        self._position = 0  # bytes hashed so far
        self._pending: dict[int, bytes] = {}
        self._pending_starts: list[int] = []  # a heap of the keys of _pending
        self._pending_bytes = 0
        self._lock = threading.Lock()
        self._value: str | None = None

    def file_start(self, file: Path) -> int:
        """Return the position of `file`'s first byte in the concatenation."""
        return self._starts[self.files.index(file)]

    def feed(self, position: int, data: memoryview) -> None:
        """Hash `data`, the bytes at `position` of the concatenated files, or keep a copy."""
        end = position + len(data)
        with self._lock:
            if self._value is not None or end <= self._position:
                return
            if position <= self._position:
                self._digest.update(data[self._position - position :])
                self._position = end
                self._hash_pending()
            elif self._pending_bytes + len(data) <= self._max_pending_bytes and position not in self._pending:
                self._pending[position] = bytes(data)
                heapq.heappush(self._pending_starts, position)
                self._pending_bytes += len(data)

    def hexdigest(self) -> str:
        """Hash the bytes not fed yet, remember the digest and return it."""
        with self._lock:
            if self._value is not None:
                return self._value
            block = bytearray(HASH_BLOCK_BYTES)  # reused: no allocation per block
            view = memoryview(block)
            while self._position < self.total_bytes:
                self._hash_pending()
                # Every piece still kept starts past the hashed position.
                next_pending = self._pending_starts[0] if self._pending_starts else self.total_bytes
                self._hash_from_files(self._position, next_pending, view)
            self._value = self._digest.hexdigest()
            self._pending.clear()
            self._pending_starts.clear()
        try:
            unchanged = _identity(self.files) == self._key
        except OSError:  # a file was removed after it was read: the value is right but not cached
            unchanged = False
        if unchanged:
            with _lock:
                _remember(self._key, self._value)
        return self._value

    def _hash_pending(self) -> None:
        # The heap gives the kept pieces in order of their starts, so each feed looks at
        # the pieces it can hash and not at every piece kept.
        while self._pending_starts and self._pending_starts[0] <= self._position:
            start = heapq.heappop(self._pending_starts)
            data = self._pending.pop(start)
            self._pending_bytes -= len(data)
            end = start + len(data)
            if end > self._position:
                self._digest.update(memoryview(data)[self._position - start :])
                self._position = end

    def _hash_from_files(self, begin: int, end: int, view: memoryview) -> None:
        for file, start, size in zip(self.files, self._starts, self._sizes):
            low, high = max(begin, start), min(end, start + size)
            if low >= high:
                continue
            try:
                handle = open(file, "rb", buffering=0)  # noqa: SIM115 - closed by the with below
            except OSError as error:
                raise CheckpointError(
                    f"{file}: cannot read it to finish its SHA-256 ({error.strerror}); it was moved or "
                    "removed during the merge, so restore it and run the merge again"
                ) from None
            with handle:
                handle.seek(low - start)
                position = low
                while position < high:
                    count = handle.readinto(view[: min(len(view), high - position)])
                    if not count:
                        raise CheckpointError(f"{file}: the file became shorter while it was hashed; run the merge again")
                    self._digest.update(view[:count])
                    position += count
        self._position = end


def _identity(files: Sequence[Path]) -> str:
    parts = []
    for file in files:
        stat = os.stat(file)
        parts.append(
            f"{os.path.realpath(file)}|{stat.st_dev}|{stat.st_ino}|{stat.st_size}|{stat.st_mtime_ns}|{stat.st_ctime_ns}"
        )
    return "\n".join(parts)


def _cache_path() -> Path:
    return cache_root() / CACHE_FILE


def _read_cache() -> dict[str, str]:
    try:
        data = json.loads(_cache_path().read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _remember(key: str, value: str) -> None:
    # A cache that cannot be written (read-only home, full disk) only costs a re-hash.
    entries = _read_cache()
    entries.pop(key, None)
    entries[key] = value
    if len(entries) > MAX_ENTRIES:
        entries = dict(list(entries.items())[-MAX_ENTRIES:])
    path = _cache_path()
    temporary = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        descriptor, temporary = tempfile.mkstemp(prefix=".sha256-", dir=path.parent)
        with os.fdopen(descriptor, "w") as handle:
            json.dump(entries, handle)
        os.replace(temporary, path)
    except OSError as error:
        logger.debug("could not update the hash cache %s: %s", path, error)
        if temporary is not None:
            Path(temporary).unlink(missing_ok=True)
