"""Fixtures for the foundation tests: tiny seeded checkpoints written to tmp_path."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from mergekit_ext.tiny import write_tiny_checkpoint


@pytest.fixture
def tiny_models(tmp_path: Path) -> Callable[..., list[Path]]:
    """Return a factory writing `count` tiny checkpoints (seeds 0..count-1) of one architecture."""

    def build(count: int = 3, architecture: str = "llama", **kwargs: object) -> list[Path]:
        return [
            write_tiny_checkpoint(tmp_path / f"{architecture}-{index}", architecture, seed=index, **kwargs)
            for index in range(count)
        ]

    return build


def leftover_partials(folder: Path) -> list[Path]:
    """Return temporary output folders the writer would leave behind after a failure."""
    return [path for path in folder.iterdir() if ".partial-" in path.name or ".replaced-" in path.name]
