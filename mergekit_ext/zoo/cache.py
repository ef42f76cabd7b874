"""Location of the zoo cache: `<cache root>/zoo/<name>-<version>/`."""

from __future__ import annotations

from pathlib import Path

from mergekit_ext.cache import cache_root


def zoo_folder(name: str, version: str) -> Path:
    """Return the cache folder of zoo `name` at format `version` (not created here)."""
    return cache_root() / "zoo" / f"{name}-{version}"
