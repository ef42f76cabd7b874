"""The checks on a merge's output folder, made before anything is read or written (no torch needed)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from mergekit_ext.errors import OutputError


def check_output_folder(output: Path, inputs: Iterable[Path], force: bool) -> None:
    """Raise `OutputError` if `output` is an input, inside one, or a non-empty folder without `force`."""
    resolved = output.resolve()
    for input_path in inputs:
        input_resolved = Path(input_path).resolve()
        input_folder = input_resolved if input_resolved.is_dir() else input_resolved.parent
        if resolved == input_folder or input_folder in resolved.parents or resolved in input_folder.parents:
            raise OutputError(
                f"output folder {output} overlaps the input {input_path}; choose an output "
                "folder outside every input"
            )
    if output.exists() and not output.is_dir():
        raise OutputError(f"output path {output} exists and is not a folder; choose another path")
    if output.exists() and any(output.iterdir()) and not force:
        raise OutputError(
            f"output folder {output} exists and is not empty; choose another folder or pass "
            "--force to replace it"
        )
