"""Start reading the first tensors of a merge's inputs while the `merge` command imports torch.

Importing torch, numba and the engine took 1.5 to 1.7 s on the 2-core development VM,
on one core, before the first read. Meanwhile `start_warmup` advises the kernel
(POSIX_FADV_WILLNEED, from a background thread) to read the start of each input into the
page cache, so the disk and the other core work during the import. The reader then
copies those bytes from the page cache and reads the rest with O_DIRECT
(`direct_read`). The merge walks the base's tensors in file order, so the start of
each file holds the tensors it reads first when the inputs share the base's layout.

Torch-free, like `layout`, so the command can call it before the heavy imports.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterable
from pathlib import Path

from mergekit_ext.checkpoint.layout import safetensors_files
from mergekit_ext.errors import CheckpointError

logger = logging.getLogger(__name__)

# Bytes requested in all, split evenly among the input files. The disk of the development
# VM read 1.3 to 1.7 GB/s with O_DIRECT, so this is about what it reads during the import.
WARMUP_BYTES = 1536 << 20


def start_warmup(inputs: Iterable[str | Path], budget: int = WARMUP_BYTES) -> threading.Thread | None:
    """Start reading the first `budget` bytes of the inputs' first weight files into the page cache.

    `inputs` are checkpoint folders or `.safetensors` files. Inputs that are missing or
    not safetensors are skipped, since the merge reports them itself. Returns the
    background thread, or None when there is nothing to read or no POSIX_FADV_WILLNEED.
    """
    if not hasattr(os, "posix_fadvise"):
        return None
    files = [file for file in (_first_file(Path(path)) for path in inputs) if file is not None]
    if not files or budget <= 0:
        return None
    share = budget // len(files)
    thread = threading.Thread(target=_advise, args=(files, share), name="mergekit-ext-warmup", daemon=True)
    thread.start()
    return thread


def _first_file(path: Path) -> Path | None:
    try:
        if path.is_file():
            return path if path.suffix == ".safetensors" else None
        if path.is_dir():
            files = safetensors_files(path)
            return files[0] if files else None
    except (OSError, CheckpointError):
        return None
    return None


def _advise(files: list[Path], share: int) -> None:
    for file in files:
        try:
            descriptor = os.open(file, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.posix_fadvise(descriptor, 0, min(share, os.fstat(descriptor).st_size), os.POSIX_FADV_WILLNEED)
        except OSError as error:
            logger.debug("could not start reading %s ahead: %s", file, error)
        finally:
            os.close(descriptor)
