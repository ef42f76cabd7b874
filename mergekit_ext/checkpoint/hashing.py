"""SHA-256 of checkpoint weight files, remembered across runs.

Hashing costs a full read of every input and about 0.55 s of CPU time per GB (hashlib
ran at 1.8 GB/s on the 2-core development machine), a large share of a merge there.
The digest of a set of files is therefore stored in `<cache root>/sha256.json` under
the files' identity: path, device, inode, size, modification time and change time, in
nanoseconds. Writing to a file changes its modification and change times, and the
change time cannot be set back from user space, so an edited file is hashed again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path

from mergekit_ext.cache import cache_root

logger = logging.getLogger(__name__)

HASH_BLOCK_BYTES = 4 * 1024 * 1024
CACHE_FILE = "sha256.json"
MAX_ENTRIES = 2000

_lock = threading.Lock()


def files_sha256(files: Sequence[Path]) -> str:
    """SHA-256 of the files' bytes concatenated in order, from the cache when unchanged."""
    key = _identity(files)
    with _lock:
        known = _read_cache().get(key)
    if known is not None:
        return known
    digest = hashlib.sha256()
    block = bytearray(HASH_BLOCK_BYTES)  # reused: no allocation per block
    view = memoryview(block)
    for file in files:
        with open(file, "rb", buffering=0) as handle:
            while count := handle.readinto(block):
                digest.update(view[:count])
    value = digest.hexdigest()
    if _identity(files) == key:  # unchanged while it was read
        with _lock:
            _remember(key, value)
    return value


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
