"""Build stamps: an output is reused only while its settings, inputs and files are unchanged."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mergekit_ext.stamp import expected_stamp, is_current, write_stamp


@pytest.fixture()
def built(tmp_path: Path) -> tuple[Path, Path, Path, dict]:
    source = tmp_path / "model"
    source.mkdir()
    (source / "model.safetensors").write_bytes(b"weights-1")
    (source / "config.json").write_text("{}")
    output = tmp_path / "merged"
    output.mkdir()
    (output / "model.safetensors").write_bytes(b"merged")
    stamp_file = tmp_path / "merged.stamp.json"
    settings = {"method": "ties", "density": 0.2}
    write_stamp(output, stamp_file, expected_stamp(settings, [source]))
    return source, output, stamp_file, settings


def test_unchanged_build_is_current(built) -> None:
    source, output, stamp_file, settings = built
    assert is_current(output, stamp_file, expected_stamp(settings, [source]))


def test_changed_setting_is_stale(built) -> None:
    source, output, stamp_file, settings = built
    assert not is_current(output, stamp_file, expected_stamp({**settings, "density": 0.5}, [source]))


def test_edited_input_is_stale_even_with_old_mtime(built) -> None:
    source, output, stamp_file, settings = built
    weights = source / "model.safetensors"
    before = weights.stat()
    weights.write_bytes(b"weights-2")  # same size
    os.utime(weights, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert not is_current(output, stamp_file, expected_stamp(settings, [source]))


def test_damaged_output_is_stale(built) -> None:
    source, output, stamp_file, settings = built
    expected = expected_stamp(settings, [source])
    (output / "model.safetensors").write_bytes(b"merg")  # truncated
    assert not is_current(output, stamp_file, expected)
    (output / "model.safetensors").unlink()
    assert not is_current(output, stamp_file, expected)


def test_missing_or_corrupt_stamp_is_stale(built) -> None:
    source, output, stamp_file, settings = built
    expected = expected_stamp(settings, [source])
    stamp_file.write_text("{not json")
    assert not is_current(output, stamp_file, expected)
    stamp_file.unlink()
    assert not is_current(output, stamp_file, expected)


def test_input_without_files_is_rejected(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no files"):
        expected_stamp({}, [empty])
