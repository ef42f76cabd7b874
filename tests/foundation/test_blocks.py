"""Row-block merging: partial reads and writes, the same bytes as whole-tensor merges."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mergekit_ext.checkpoint import Checkpoint, PlannedTensor, StreamingWriter
from mergekit_ext.checkpoint.hashing import files_sha256
from mergekit_ext import engine
from mergekit_ext.engine import MergeOptions, run_recipe
from mergekit_ext.errors import CheckpointError, InvalidTensorError, OutputError
from mergekit_ext.methods.inputs import all_finite
from mergekit_ext.recipe import parse_recipe

ModelFactory = Callable[..., list[Path]]


def test_row_range_read_equals_slice(tmp_path: Path) -> None:
    generator = torch.Generator().manual_seed(0)
    state = {
        "w": torch.randn(37, 5, generator=generator).to(torch.bfloat16),
        "v": torch.randn(11, generator=generator),
    }
    save_file(state, str(tmp_path / "model.safetensors"))
    checkpoint = Checkpoint.open(tmp_path)
    assert torch.equal(checkpoint.load("w", (3, 20)), state["w"][3:20])
    assert torch.equal(checkpoint.load("w", (36, 37)), state["w"][36:])
    assert checkpoint.load("w", (4, 4)).shape == (0, 5)
    assert torch.equal(checkpoint.load("v", (2, 9)), state["v"][2:9])
    with pytest.raises(CheckpointError, match="rows 30:38 are outside tensor 'w'"):
        checkpoint.load("w", (30, 38))


def test_row_blocks_write_the_same_file(tmp_path: Path) -> None:
    generator = torch.Generator().manual_seed(1)
    state = {"a": torch.randn(10, 3, generator=generator), "b": torch.randn(4, generator=generator)}
    plan = [PlannedTensor(name, tuple(t.shape), t.dtype) for name, t in state.items()]
    with StreamingWriter(tmp_path / "whole", plan) as writer:
        for name, tensor in state.items():
            writer.write(name, tensor)
        writer.commit()
    with StreamingWriter(tmp_path / "blocks", plan) as writer:
        for start in (8, 0, 4):  # any order
            writer.write("a", state["a"][start : start + 4], row_start=start)
        writer.write("b", state["b"][:2], row_start=0)
        writer.write("b", state["b"][2:], row_start=2)
        writer.commit()
    whole = (tmp_path / "whole" / "model.safetensors").read_bytes()
    assert (tmp_path / "blocks" / "model.safetensors").read_bytes() == whole


def test_row_block_errors(tmp_path: Path) -> None:
    plan = [PlannedTensor("a", (6, 2), torch.float32)]
    with pytest.raises(OutputError) as error:
        with StreamingWriter(tmp_path / "out", plan) as writer:
            writer.write("a", torch.zeros(4, 2), row_start=4)
    assert "rows from 4" in str(error.value)
    with pytest.raises(OutputError, match="written more than once"):
        with StreamingWriter(tmp_path / "out", plan) as writer:
            writer.write("a", torch.zeros(6, 2))
            writer.write("a", torch.zeros(2, 2), row_start=0)
    with pytest.raises(OutputError, match="not written"):
        with StreamingWriter(tmp_path / "out", plan) as writer:
            writer.write("a", torch.zeros(3, 2), row_start=0)
            writer.commit()
    assert not (tmp_path / "out").exists()


def recipe(method: str, base: Path, models: list[Path]) -> object:
    return parse_recipe(
        {
            "merge_method": method,
            "base_model": str(base),
            "models": [{"model": str(path), "parameters": {"weight": 0.3 + index}} for index, path in enumerate(models)],
            "parameters": {"lambda": 0.7} if method == "task_arithmetic" else {},
            "dtype": "bfloat16",
        }
    )


@pytest.mark.parametrize("method", ["task_arithmetic", "linear"])
def test_block_merge_equals_whole_merge(tiny_models: ModelFactory, tmp_path: Path, method: str) -> None:
    base, *models = tiny_models(3)
    outputs = {}
    for label, block in (("whole", 1 << 30), ("blocks", 100)):
        options = MergeOptions(output=tmp_path / label, block_elements=block, prefetch=3)
        run_recipe(recipe(method, base, models), options)
        outputs[label] = load_file(str(tmp_path / label / "model.safetensors"))
    assert outputs["whole"].keys() == outputs["blocks"].keys()
    for name, tensor in outputs["whole"].items():
        assert torch.equal(outputs["blocks"][name], tensor), name


def test_late_block_nan_is_named(tiny_models: ModelFactory, tmp_path: Path) -> None:
    base, first, second = tiny_models(3)
    state = load_file(str(second / "model.safetensors"))
    name = max(state, key=lambda key: state[key].numel())
    state[name].view(-1)[-1] = float("nan")
    save_file(state, str(second / "model.safetensors"))
    with pytest.raises(InvalidTensorError) as error:
        run_recipe(recipe("task_arithmetic", base, [first, second]), MergeOptions(output=tmp_path / "out", block_elements=64))
    assert name in str(error.value)
    assert str(second) in str(error.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("method", ["ties", "task_arithmetic"])
@pytest.mark.parametrize("culprit", [0, 2])
def test_fused_merge_names_non_finite_input(method: str, culprit: int, tmp_path: Path) -> None:
    # These methods check their inputs inside the fused kernels, which take tensors of
    # 65536 entries or more, instead of in the reader.
    generator = torch.Generator().manual_seed(5)
    folders = []
    for index in range(3):
        folder = tmp_path / f"input-{index}"
        folder.mkdir()
        state = {
            "big.weight": torch.randn(300, 256, generator=generator).to(torch.bfloat16),
            "small.weight": torch.randn(8, generator=generator).to(torch.bfloat16),
        }
        if index == culprit:
            state["big.weight"][299, 255] = float("nan")
        save_file(state, str(folder / "model.safetensors"))
        folders.append(folder)
    with pytest.raises(InvalidTensorError) as error:
        run_recipe(recipe(method, folders[0], folders[1:]), MergeOptions(output=tmp_path / "out"))
    assert "'big.weight'" in str(error.value)
    assert f"in {folders[culprit]} contains" in str(error.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_finiteness_check_on_a_large_tensor(bad: float, dtype: torch.dtype) -> None:
    # Large enough for the fused kernel (float32 and bf16) and for torch's vectorized
    # and multi-threaded reduction (float16, and a column that is not contiguous).
    tensor = torch.zeros(3_000_001, dtype=dtype)
    assert all_finite(tensor)
    tensor[1_234_567] = bad
    assert not all_finite(tensor)
    assert not all_finite(tensor.reshape(-1, 1)[:, 0])
    assert not all_finite(torch.stack([tensor[1:], tensor[1:]], dim=1)[:, 0])
    extremes = torch.zeros(3_000_001, dtype=dtype)
    extremes[5] = torch.finfo(dtype).max
    extremes[6] = -torch.finfo(dtype).max
    assert all_finite(extremes)
    assert all_finite(torch.full((5,), torch.finfo(dtype).max))
    assert all_finite(torch.zeros(0, dtype=dtype))


def test_hash_is_remembered(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import hashlib

    from mergekit_ext.checkpoint import hashing

    monkeypatch.setenv("MERGEKIT_EXT_CACHE", str(tmp_path / "cache"))
    file = tmp_path / "weights.bin"
    file.write_bytes(b"a" * 1000)
    expected = hashlib.sha256(b"a" * 1000).hexdigest()
    assert files_sha256([file]) == expected
    assert (tmp_path / "cache" / "sha256.json").is_file()

    def no_hashing(*args: object) -> object:
        raise AssertionError("the file was hashed again")

    # A remembered digest comes back without hashing the file.
    monkeypatch.setattr(hashing.hashlib, "sha256", no_hashing)
    assert files_sha256([file]) == expected


def test_edited_file_is_hashed_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import hashlib

    monkeypatch.setenv("MERGEKIT_EXT_CACHE", str(tmp_path / "cache"))
    file = tmp_path / "weights.bin"
    file.write_bytes(b"a" * 1000)
    stat = os.stat(file)
    assert files_sha256([file]) == hashlib.sha256(b"a" * 1000).hexdigest()
    file.write_bytes(b"b" * 1000)  # same size
    os.utime(file, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # even with the old mtime put back
    assert files_sha256([file]) == hashlib.sha256(b"b" * 1000).hexdigest()


@pytest.mark.parametrize("method", ["ties", "task_arithmetic"])
def test_bf16_inputs_match_float32_copies(tiny_models: ModelFactory, tmp_path: Path, method: str) -> None:
    # These methods take bf16 inputs as stored and convert block by block; the result
    # must equal the merge of float32 copies of the same checkpoints. The engine runs
    # them with one torch thread and restores the thread count afterwards.
    bf16 = tiny_models(3, dtype=torch.bfloat16)
    float32 = []
    for folder in bf16:
        state = {name: tensor.float() for name, tensor in load_file(str(folder / "model.safetensors")).items()}
        copy = tmp_path / f"{folder.name}-f32"
        copy.mkdir()
        save_file(state, str(copy / "model.safetensors"))
        (copy / "config.json").write_bytes((folder / "config.json").read_bytes())
        float32.append(copy)
    threads = torch.get_num_threads()
    outputs = {}
    for label, (base, *models) in (("bf16", bf16), ("float32", float32)):
        run_recipe(recipe(method, base, models), MergeOptions(output=tmp_path / label))
        outputs[label] = load_file(str(tmp_path / label / "model.safetensors"))
    assert torch.get_num_threads() == threads
    for name, tensor in outputs["float32"].items():
        assert torch.equal(outputs["bf16"][name], tensor), name


def test_ties_bf16_nan_is_named(tiny_models: ModelFactory, tmp_path: Path) -> None:
    base, first, second = tiny_models(3, dtype=torch.bfloat16)
    state = load_file(str(second / "model.safetensors"))
    name = max(state, key=lambda key: state[key].numel())
    state[name].view(-1)[7] = float("nan")
    save_file(state, str(second / "model.safetensors"))
    with pytest.raises(InvalidTensorError) as error:
        run_recipe(recipe("ties", base, [first, second]), MergeOptions(output=tmp_path / "out"))
    assert name in str(error.value)
    assert str(second) in str(error.value)
    assert not (tmp_path / "out").exists()


def concurrency_probe(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Record the largest number of units merging at once, in the returned list's first item."""
    lock = threading.Lock()
    state = {"now": 0}
    peak = [0]
    merge_one = engine._merge_one

    def counted(*args: object, **kwargs: object) -> torch.Tensor:
        with lock:
            state["now"] += 1
            peak[0] = max(peak[0], state["now"])
        try:
            # A short pause, so a unit that could merge beside this one gets the chance.
            time.sleep(0.002)
            return merge_one(*args, **kwargs)
        finally:
            with lock:
                state["now"] -= 1

    monkeypatch.setattr(engine, "_merge_one", counted)
    return peak


@pytest.mark.parametrize("method", ["ties", "dare_ties", "task_arithmetic"])
def test_concurrent_merges_match_one_at_a_time(
    tiny_models: ModelFactory, tmp_path: Path, method: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    base, *models = tiny_models(3)
    peak = concurrency_probe(monkeypatch)
    outputs = {}
    progress: dict[int, list[tuple[int, int, str]]] = {}
    for workers in (1, 3):
        options = MergeOptions(output=tmp_path / f"workers-{workers}", merge_workers=workers, block_elements=100, seed=5)
        calls = progress.setdefault(workers, [])
        run_recipe(recipe(method, base, models), options, lambda *call: calls.append(call))
        outputs[workers] = (options.output / "model.safetensors").read_bytes()
    assert outputs[3] == outputs[1]
    assert progress[3] == progress[1]
    assert [done for done, _, _ in progress[3]] == list(range(len(progress[3])))
    assert peak[0] == 3


def test_concurrent_merges_stay_in_window(
    tiny_models: ModelFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base, *models = tiny_models(3)
    peak = concurrency_probe(monkeypatch)
    # A window of one byte admits no unit beside the oldest, so merges run one at a time.
    options = MergeOptions(output=tmp_path / "out", merge_workers=3, prefetch_bytes=1)
    run_recipe(recipe("ties", base, models), options)
    assert peak[0] == 1


@pytest.mark.parametrize(("method", "ahead"), [("ties", 4), ("linear", 2)])
def test_read_window_counts_loaded_dtype(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, method: str, ahead: int
) -> None:
    # Three bf16 checkpoints of eight tensors. TIES takes bf16 inputs as stored, so a window
    # of four bf16 units contains four. Linear takes float32, whose units are twice the size.
    generator = torch.Generator().manual_seed(3)
    paths = []
    for index in range(3):
        path = tmp_path / f"input-{index}"
        path.mkdir()
        state = {f"t{k}": torch.randn(1000, generator=generator).to(torch.bfloat16) for k in range(8)}
        save_file(state, str(path / "model.safetensors"))
        paths.append(path)
    loaded: list[str] = []
    seen_by_first_merge: list[int] = []
    load_one, merge_one = engine._load_one, engine._merge_one

    def recording_load(unit: engine._Unit, *args: object) -> torch.Tensor:
        loaded.append(unit.item.name)
        return load_one(unit, *args)

    def slow_first_merge(*args: object, **kwargs: object) -> torch.Tensor:
        if not seen_by_first_merge:
            time.sleep(0.3)  # the read threads finish every load submitted so far
            seen_by_first_merge.append(len(set(loaded)))
        return merge_one(*args, **kwargs)

    monkeypatch.setattr(engine, "_load_one", recording_load)
    monkeypatch.setattr(engine, "_merge_one", slow_first_merge)
    window = 4 * 1000 * 2 * 3  # four units of three bf16 inputs
    options = MergeOptions(output=tmp_path / "out", merge_workers=1, prefetch_bytes=window)
    run_recipe(recipe(method, paths[0], paths[1:]), options)
    # The merging unit is outside the window, and the units read ahead fill it.
    assert seen_by_first_merge == [1 + ahead]


def test_base_listed_as_model_warns(
    tiny_models: ModelFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    base, first, second = tiny_models(3)
    plain = run_recipe(recipe("ties", base, [first, second]), MergeOptions(output=tmp_path / "plain"))
    with caplog.at_level("WARNING", logger="mergekit_ext.engine"):
        # Last in the list, so the other models keep their weights.
        listed = run_recipe(recipe("ties", base, [first, second, base]), MergeOptions(output=tmp_path / "listed"))
    assert any("also listed under the models" in record.getMessage() for record in caplog.records)
    assert listed.tensors == plain.tensors
    merged = (tmp_path / "listed" / "model.safetensors").read_bytes()
    assert merged == (tmp_path / "plain" / "model.safetensors").read_bytes()
