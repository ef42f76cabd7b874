"""Location of the mergekit-ext cache folder (zoos, demo runs, remembered file hashes).

The cache root is `$MERGEKIT_EXT_CACHE` when set, else `$XDG_CACHE_HOME/mergekit-ext`,
else `~/.cache/mergekit-ext`.
"""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV_VAR = "MERGEKIT_EXT_CACHE"


def cache_root() -> Path:
    """Return the root folder of the mergekit-ext cache (not created here)."""
    override = os.environ.get(CACHE_ENV_VAR)
    if override:
        return Path(override).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "mergekit-ext"
