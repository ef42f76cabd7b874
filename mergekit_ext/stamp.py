"""Build stamps: reuse an output folder only while its settings, inputs and code are unchanged.

A stamp records what an output folder was built from: the settings, the SHA-256 of
every input file, the SHA-256 of this package's source files, and the size of every
file the build wrote. The output is current while all of these still match. An edit
to an input, a setting or the merge code, or a missing or resized output file, means
a rebuild. Digests come from the digest cache (`mergekit_ext.checkpoint.hashing`), so
checking a stamp does not read unchanged files again.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mergekit_ext.checkpoint.hashing import files_sha256

STAMP_VERSION = 1
PACKAGE_ROOT = Path(__file__).resolve().parent


def _files_of(path: Path) -> list[Path]:
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.is_file())
    return [path]


def source_digest() -> str:
    """SHA-256 of this package's Python source files (their bytes, in path order)."""
    return files_sha256(sorted(PACKAGE_ROOT.rglob("*.py")))


def expected_stamp(settings: Mapping[str, Any], inputs: Sequence[Path]) -> dict[str, Any]:
    """Return the stamp a build from these settings and inputs (files or folders) would carry."""
    digests = {}
    for item in inputs:
        files = _files_of(item)
        if not files:
            raise FileNotFoundError(f"{item} has no files to build from")
        digests[str(item)] = files_sha256(files)
    return {"version": STAMP_VERSION, "settings": dict(settings), "inputs": digests, "source": source_digest()}


def _output_sizes(output: Path) -> dict[str, int]:
    return {str(p.relative_to(output)): p.stat().st_size for p in _files_of(output)}


def is_current(output: Path, stamp_file: Path, expected: Mapping[str, Any]) -> bool:
    """Return True when `output` was built by the build `expected` describes and is intact."""
    if not output.is_dir() or not stamp_file.is_file():
        return False
    try:
        recorded = json.loads(stamp_file.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    sizes = recorded.pop("outputs", None)
    if recorded != json.loads(json.dumps(expected)) or not isinstance(sizes, dict):
        return False
    return _output_sizes(output) == sizes


def write_stamp(output: Path, stamp_file: Path, expected: Mapping[str, Any]) -> None:
    """Record that `output` was just built as `expected` describes (written atomically)."""
    stamp = {**expected, "outputs": _output_sizes(output)}
    temporary = stamp_file.with_name(stamp_file.name + ".tmp")
    temporary.write_text(json.dumps(stamp, indent=2, sort_keys=True) + "\n")
    os.replace(temporary, stamp_file)
