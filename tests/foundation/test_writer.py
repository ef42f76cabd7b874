"""The streaming writer: shard layout, index, atomic commit and refusals."""

from __future__ import annotations

import json
from collections import namedtuple
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mergekit_ext.checkpoint import Checkpoint, PlannedTensor, StreamingWriter, parse_size
from mergekit_ext.errors import OutputError

from .conftest import leftover_partials


def plan_of(state: dict[str, torch.Tensor]) -> list[PlannedTensor]:
    return [PlannedTensor(name, tuple(t.shape), t.dtype) for name, t in state.items()]


def sample_state() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        "a": torch.randn(8, 8, generator=generator),
        "b": torch.randn(8, 8, generator=generator).to(torch.bfloat16),
        "c": torch.randn(3, generator=generator),
        "d": torch.arange(5, dtype=torch.int64),
        "e": torch.tensor(2.5),
    }


def test_single_shard_round_trip(tmp_path: Path) -> None:
    state = sample_state()
    with StreamingWriter(tmp_path / "out", plan_of(state)) as writer:
        for name in reversed(list(state)):  # any order: tensors go to planned offsets
            writer.write(name, state[name])
        writer.commit()
    loaded = load_file(str(tmp_path / "out" / "model.safetensors"))
    for name, tensor in state.items():
        assert loaded[name].dtype == tensor.dtype
        assert torch.equal(loaded[name], tensor)
    assert not (tmp_path / "out" / "model.safetensors.index.json").exists()


def test_sharding_and_index_total_size(tmp_path: Path) -> None:
    state = sample_state()
    with StreamingWriter(tmp_path / "out", plan_of(state), shard_size=300) as writer:
        for name, tensor in state.items():
            writer.write(name, tensor)
        writer.commit()
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    expected_total = sum(t.numel() * t.element_size() for t in state.values())
    assert index["metadata"]["total_size"] == expected_total
    files = sorted(set(index["weight_map"].values()))
    assert len(files) >= 2
    assert files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    checkpoint = Checkpoint.open(tmp_path / "out")
    for name, tensor in state.items():
        assert torch.equal(checkpoint.load(name), tensor)


def test_exception_leaves_nothing(tmp_path: Path) -> None:
    state = sample_state()
    with pytest.raises(RuntimeError):
        with StreamingWriter(tmp_path / "out", plan_of(state)) as writer:
            writer.write("a", state["a"])
            raise RuntimeError("merge failed")
    assert not (tmp_path / "out").exists()
    assert leftover_partials(tmp_path) == []


def test_commit_with_unwritten_tensor_fails(tmp_path: Path) -> None:
    state = sample_state()
    with pytest.raises(OutputError, match="not written"):
        with StreamingWriter(tmp_path / "out", plan_of(state)) as writer:
            writer.write("a", state["a"])
            writer.commit()
    assert not (tmp_path / "out").exists()


def test_wrong_shape_or_dtype_is_rejected(tmp_path: Path) -> None:
    state = sample_state()
    with StreamingWriter(tmp_path / "out", plan_of(state)) as writer:
        with pytest.raises(OutputError, match=r"shape \(4,\)"):
            writer.write("c", torch.zeros(4))
        with pytest.raises(OutputError, match="dtype"):
            writer.write("a", state["a"].half())


def test_non_empty_output_needs_force(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    state = sample_state()
    with pytest.raises(OutputError, match="--force"):
        StreamingWriter(out, plan_of(state))
    assert (out / "keep.txt").read_text() == "user data"

    with StreamingWriter(out, plan_of(state), force=True) as writer:
        for name, tensor in state.items():
            writer.write(name, tensor)
        writer.commit()
    assert not (out / "keep.txt").exists()
    assert (out / "model.safetensors").exists()
    assert leftover_partials(tmp_path) == []


def earlier_output(tmp_path: Path) -> Path:
    """Create the folder `out` with one user file, as an output that a forced merge replaces."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    return out


def write_all(writer: StreamingWriter, state: dict[str, torch.Tensor]) -> None:
    for name, tensor in state.items():
        writer.write(name, tensor)


def test_interrupted_replace_restores_old_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    out = earlier_output(tmp_path)
    state = sample_state()
    replace = os.replace

    def interrupted_second_rename(source: Path, target: Path) -> None:
        if Path(source).name.startswith(".out.partial-"):
            raise KeyboardInterrupt  # a Ctrl-C between moving the old output aside and the new one in
        replace(source, target)

    with StreamingWriter(out, plan_of(state), force=True) as writer:
        write_all(writer, state)
        monkeypatch.setattr(os, "replace", interrupted_second_rename)
        with pytest.raises(KeyboardInterrupt):
            writer.commit()
    assert (out / "keep.txt").read_text() == "user data"
    assert not (out / "model.safetensors").exists()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out"]


def test_interrupted_cleanup_keeps_new_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    from mergekit_ext.critical import in_critical_section

    out = earlier_output(tmp_path)
    state = sample_state()
    seen_in_section = []

    def interrupted_removal(path: Path, ignore_errors: bool = False) -> None:
        seen_in_section.append(in_critical_section())
        raise KeyboardInterrupt  # a Ctrl-C while the old output is removed

    with StreamingWriter(out, plan_of(state), force=True) as writer:
        write_all(writer, state)
        monkeypatch.setattr(shutil, "rmtree", interrupted_removal)
        with pytest.raises(KeyboardInterrupt):
            writer.commit()
        monkeypatch.undo()
    # The new output is in place, and leaving the writer does not remove it.
    assert seen_in_section == [True]
    assert torch.equal(load_file(str(out / "model.safetensors"))["a"], state["a"])
    assert not in_critical_section()


def test_output_equal_to_input(tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    (model / "model.safetensors").write_bytes(b"")
    with pytest.raises(OutputError, match="overlaps the input"):
        StreamingWriter(model, plan_of(sample_state()), inputs=[model], force=True)
    with pytest.raises(OutputError, match="overlaps the input"):
        StreamingWriter(model / "sub", plan_of(sample_state()), inputs=[model])


def test_not_enough_disk_space(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr("shutil.disk_usage", lambda path: Usage(10**9, 10**9, 1000))
    with pytest.raises(OutputError, match="not enough free disk space"):
        StreamingWriter(tmp_path / "out", plan_of(sample_state()))
    assert not (tmp_path / "out").exists()
    assert leftover_partials(tmp_path) == []


def test_disk_full_while_writing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    state = sample_state()
    writer = StreamingWriter(tmp_path / "out", plan_of(state))

    def full_disk(*args: object) -> None:
        raise OSError(28, "No space left on device")

    with pytest.raises(OutputError, match="No space left on device"):
        with writer:
            writer.write("a", state["a"])
            shard = writer._shards[0]
            monkeypatch.setattr(shard.handle, "write_at", full_disk)
            writer.write("b", state["b"])
    assert not (tmp_path / "out").exists()
    assert leftover_partials(tmp_path) == []


@pytest.mark.parametrize(("text", "expected"), [("5GB", 5 * 10**9), ("500MB", 5 * 10**8), ("2GiB", 2 * 1024**3), ("123", 123)])
def test_parse_size(text: str, expected: int) -> None:
    assert parse_size(text) == expected


def test_parse_size_rejects_garbage() -> None:
    with pytest.raises(OutputError, match="invalid size"):
        parse_size("five gigs")
