"""Session-wide fixtures shared by every test folder."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import tempfile
from pathlib import Path
from typing import Any, NamedTuple

import pytest


class BuiltZoo(NamedTuple):
    """A built zoo: its folder and its parsed `zoo.json`."""

    path: Path
    manifest: dict[str, Any]


@pytest.fixture(scope="session")
def small_text_zoo() -> BuiltZoo:
    """Build the small text zoo (3 tasks, few steps) once and return (folder, manifest).

    The folder lives under the system temp folder and is keyed by the hash of the
    zoo settings, so repeated local runs reuse it. A clean CI machine builds it once.
    """
    from mergekit_ext.zoo.text import FORMAT_VERSION, SMALL_TASKS, TextZooSettings, build_text_zoo

    settings = TextZooSettings.small()
    key_source = json.dumps(
        {"settings": dataclasses.asdict(settings), "tasks": SMALL_TASKS, "format": FORMAT_VERSION}, sort_keys=True
    )
    key = hashlib.sha256(key_source.encode()).hexdigest()[:12]
    folder = Path(tempfile.gettempdir()) / "mergekit-ext-tests" / f"text-small-{key}"
    path, manifest = build_text_zoo(folder, settings=settings, small=True)
    return BuiltZoo(path, manifest)
