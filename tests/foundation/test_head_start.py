"""The head start: the first tensors read before the merge code loads, then taken by the merge's reads."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from mergekit_ext.checkpoint.direct_read import ALIGNMENT, MIN_DIRECT_BYTES, RawFile
from mergekit_ext.checkpoint.head_start import HeadStart, _Region
from mergekit_ext.checkpoint.reader import Checkpoint
from mergekit_ext.checkpoint.safetensors_header import read_header
from mergekit_ext.cli.main import cli
from mergekit_ext.engine import MergeOptions, run_recipe
from mergekit_ext.errors import CheckpointError
from mergekit_ext.recipe import parse_recipe
from mergekit_ext.tiny import write_tiny_checkpoint
from tests.foundation.test_direct_read import evict


def write_tensors(path: Path, seed: int, rows: int = 700) -> dict[str, torch.Tensor]:
    """Write bf16 tensors of odd sizes: the large ones span several O_DIRECT pieces, `b` starts unaligned."""
    generator = torch.Generator().manual_seed(seed)
    state = {
        "a": torch.randn(rows, 1024, generator=generator).to(torch.bfloat16),  # 1.4 MB at 700 rows
        "b": torch.randn(3, 5, generator=generator).to(torch.bfloat16),
        "c": torch.randn(rows + 3, 1024, generator=generator).to(torch.bfloat16),
        "d": torch.randn(16, generator=generator).to(torch.bfloat16),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path))
    return state


def file_bytes(path: Path, name: str) -> bytes:
    header = read_header(path)
    entry = header.entries[name]
    with path.open("rb") as handle:
        handle.seek(header.data_start + entry.begin)
        return handle.read(entry.nbytes)


def tensor_range(path: Path, name: str) -> tuple[int, int]:
    header = read_header(path)
    entry = header.entries[name]
    return header.data_start + entry.begin, entry.nbytes


def file_order(path: Path, names: str) -> list[str]:
    return sorted(names, key=lambda name: tensor_range(path, name)[0])


def read_through(head_start: HeadStart, path: Path, offset: int, nbytes: int) -> bytes:
    raw = RawFile(path, head_start=head_start.for_file(path))
    try:
        return raw.read(offset, nbytes, "range").numpy().tobytes()
    finally:
        raw.close()


def test_whole_tensors_served(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    write_tensors(path, seed=0)
    with HeadStart.begin([path], budget=1 << 30) as head_start:
        regions = head_start.for_file(path)
        assert regions is not None
        # The tensors of 1 MB or more (a and c) fit in the budget, in file order.
        assert [region.description for region in regions.regions] == [f"tensor {name!r}" for name in file_order(path, "ac")]
        # The small ones are left to the merge's own reads.
        for name in "bd":
            assert regions.take(*tensor_range(path, name)) is None
        for name in "ac":
            offset, nbytes = tensor_range(path, name)
            served = regions.take(offset, nbytes)
            assert served is not None
            buffer, start = served
            assert bytes(buffer[start : start + nbytes]) == file_bytes(path, name)
        # Each region is dropped once all of it was handed out.
        assert regions.regions == []
        offset, nbytes = tensor_range(path, "a")
        assert regions.take(offset, nbytes) is None


def test_row_blocks_from_several_threads(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    write_tensors(path, seed=1, rows=2100)  # 4.3 MB: pieces of a large tensor
    evict(path, required=False)  # so the head start reads with O_DIRECT where the file system allows
    offset, nbytes = tensor_range(path, "a")
    row = nbytes // 2100
    blocks = [(offset + start * row, min(150, 2100 - start) * row) for start in range(0, 2100, 150)]
    with HeadStart.begin([path], budget=1 << 30) as head_start:
        with ThreadPoolExecutor(max_workers=4) as pool:
            pieces = list(pool.map(lambda block: read_through(head_start, path, *block), blocks))
        regions = head_start.for_file(path)
        assert regions is not None
        assert [region.description for region in regions.regions] == ["tensor 'c'"]
    assert b"".join(pieces) == file_bytes(path, "a")


def test_budget_prefix_then_rest_on_request(tmp_path: Path) -> None:
    base, model = tmp_path / "base.safetensors", tmp_path / "model.safetensors"
    write_tensors(base, seed=2, rows=2100)
    write_tensors(model, seed=3, rows=2100)
    evict(base, required=False)
    evict(model, required=False)
    offset, nbytes = tensor_range(base, "a")
    # The budget covers all of the base's first tensor and a third of the model's.
    head_start = HeadStart.begin([base, model], budget=nbytes + nbytes // 3)
    assert head_start is not None
    with head_start:
        model_regions = head_start.for_file(model)
        assert model_regions is not None and len(model_regions.regions) == 1
        assert model_regions.regions[0].target == nbytes // 3
        # The head start reads no further than the budget, rounded up to the O_DIRECT alignment.
        deadline = time.monotonic() + 10
        while not model_regions.regions[0].filled and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.2)
        assert nbytes // 3 <= model_regions.regions[0].filled < nbytes // 3 + ALIGNMENT
        # A request that starts in the part read ahead is read to its end.
        assert read_through(head_start, model, offset, nbytes) == file_bytes(model, "a")
        assert read_through(head_start, base, offset, nbytes) == file_bytes(base, "a")
        # A tensor past the budget is left to the merge's own reads.
        c_offset, c_nbytes = tensor_range(base, "c")
        base_regions = head_start.for_file(base)
        assert base_regions is not None and base_regions.take(c_offset, c_nbytes) is None
        assert read_through(head_start, base, c_offset, c_nbytes) == file_bytes(base, "c")


def test_reference_order_sets_regions(tmp_path: Path) -> None:
    reference, other = tmp_path / "reference.safetensors", tmp_path / "other.safetensors"
    generator = torch.Generator().manual_seed(4)
    save_file({name: torch.randn(512, 1024, generator=generator) for name in ("x", "y")}, str(reference))
    # safetensors puts wider dtypes first, so this file stores y before x.
    save_file({"x": torch.randn(512, 1024, generator=generator), "y": torch.randn(512, 512, dtype=torch.float64)}, str(other))
    assert tensor_range(other, "y")[0] < tensor_range(other, "x")[0]
    _, nbytes = tensor_range(reference, "x")
    with HeadStart.begin([reference, other], budget=2 * nbytes) as head_start:
        # The budget covers tensor x of both files, the reference's first tensor.
        for path in (reference, other):
            regions = head_start.for_file(path)
            assert regions is not None
            assert [region.description for region in regions.regions] == ["tensor 'x'"]


def test_sharded_checkpoint_regions(tmp_path: Path) -> None:
    folder = tmp_path / "sharded"
    folder.mkdir()
    first = write_tensors(folder / "model-00001-of-00002.safetensors", seed=5)
    second = {"z": torch.arange(300000, dtype=torch.float32)}
    save_file(second, str(folder / "model-00002-of-00002.safetensors"))
    weight_map = {name: "model-00001-of-00002.safetensors" for name in first} | {"z": "model-00002-of-00002.safetensors"}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    checkpoint = Checkpoint.open(folder)
    with HeadStart.begin([folder], budget=1 << 30) as head_start:
        checkpoint.head_start = head_start
        for name in checkpoint.names:
            loaded = checkpoint.load(name)
            expected = first[name] if name in first else second[name]
            assert torch.equal(loaded, expected)
        for file in checkpoint.files:
            regions = head_start.for_file(file)
            assert regions is not None and regions.regions == []
    checkpoint.close()


@pytest.mark.parametrize("kind", ["missing", "pickled", "malformed"])
def test_no_head_start_for_bad_inputs(tmp_path: Path, kind: str) -> None:
    good = tmp_path / "good.safetensors"
    write_tensors(good, seed=6)
    bad = tmp_path / "bad"
    bad.mkdir()
    if kind == "pickled":
        torch.save({"a": torch.zeros(2)}, bad / "pytorch_model.bin")
    elif kind == "malformed":
        (bad / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    else:
        bad = tmp_path / "absent"
    assert HeadStart.begin([good, bad]) is None


def test_failed_read_falls_back(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    write_tensors(path, seed=7)
    offset, nbytes = tensor_range(path, "a")
    # The file is cut short after its header was read: the head start's read fails.
    with path.open("r+b") as handle:
        handle.truncate(offset + nbytes // 2)
    head_start = HeadStart([_Region(path.resolve(), offset, nbytes, "tensor 'a'", target=nbytes)])
    head_start.start()
    with head_start:
        regions = head_start.for_file(path)
        assert regions is not None
        assert regions.take(offset, nbytes) is None
        raw = RawFile(path, head_start=regions)
        with pytest.raises(CheckpointError, match="file is truncated: tensor 'a'"):
            raw.read(offset, nbytes, "tensor 'a'")
        raw.close()


def test_close_keeps_served_views(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    write_tensors(path, seed=8, rows=2100)
    offset, nbytes = tensor_range(path, "a")
    head_start = HeadStart.begin([path], budget=1 << 30)
    assert head_start is not None
    raw = RawFile(path, head_start=head_start.for_file(path))
    served = raw.read(offset, nbytes, "tensor 'a'")
    head_start.close()
    assert served.numpy().tobytes() == file_bytes(path, "a")
    c_offset, c_nbytes = tensor_range(path, "c")
    regions = head_start.for_file(path)
    assert regions is not None and regions.take(c_offset, c_nbytes) is None
    assert raw.read(c_offset, c_nbytes, "tensor 'c'").numpy().tobytes() == file_bytes(path, "c")
    raw.close()


def test_merge_same_with_head_start(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folders = [
        write_tiny_checkpoint(tmp_path / f"m{index}", seed=index, hidden=64, vocab_size=8192, dtype=torch.bfloat16)
        for index in range(3)
    ]
    recipe = parse_recipe(
        {
            "merge_method": "ties",
            "base_model": str(folders[0]),
            "models": [{"model": str(folder), "parameters": {"weight": 0.5, "density": 0.4}} for folder in folders[1:]],
        }
    )

    # Empty digest caches, so both merges hash their inputs from the bytes they read.
    monkeypatch.setenv("MERGEKIT_EXT_CACHE", str(tmp_path / "cache-plain"))
    plain = run_recipe(recipe, MergeOptions(output=tmp_path / "plain"))
    monkeypatch.setenv("MERGEKIT_EXT_CACHE", str(tmp_path / "cache-early"))

    first = Checkpoint.open(folders[0])
    first_bytes = first.info(first.names[0]).nbytes
    first.close()
    # The first tensor (a vocabulary table, 1 MB) takes the O_DIRECT path; the budget covers it in all inputs.
    assert first_bytes >= MIN_DIRECT_BYTES
    head_start = HeadStart.begin(folders, budget=3 * first_bytes)
    assert head_start is not None

    with head_start:
        early = run_recipe(recipe, MergeOptions(output=tmp_path / "early", head_start=head_start))
        for folder in folders:
            regions = head_start.for_file(folder / "model.safetensors")
            assert regions is not None and regions.regions == []

    assert (tmp_path / "plain" / "model.safetensors").read_bytes() == (tmp_path / "early" / "model.safetensors").read_bytes()
    assert early.input_hashes == plain.input_hashes
    expected = {str(folder): hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest() for folder in folders}
    assert early.input_hashes == expected


def test_head_start_imports_without_torch() -> None:
    # The head start is only worth it if it begins before torch is imported.
    code = (
        "import sys\n"
        "from mergekit_ext.checkpoint.head_start import HeadStart\n"
        "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if m.startswith('torch'))\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_deleted_file_ends_quietly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "m.safetensors"
    write_tensors(path, seed=9)
    offset, nbytes = tensor_range(path, "a")
    errors: list[BaseException | None] = []
    monkeypatch.setattr(threading, "excepthook", lambda args: errors.append(args.exc_value))
    head_start = HeadStart([_Region(path.resolve(), offset, nbytes, "tensor 'a'", target=nbytes)])
    # The file goes away after its header was read and before the thread opens it.
    path.unlink()
    head_start.start()
    with head_start:
        regions = head_start.for_file(path)
        assert regions is not None
        assert regions.take(offset, nbytes) is None
    assert errors == []


def test_cli_skips_head_start_for_rejected_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folders = [write_tiny_checkpoint(tmp_path / f"m{index}", seed=index) for index in range(3)]
    output = tmp_path / "out"
    output.mkdir()
    (output / "keep.txt").write_text("not empty")
    begun: list[object] = []
    monkeypatch.setattr(HeadStart, "begin", classmethod(lambda cls, *args, **kwargs: begun.append(args)))
    arguments = ["ties", "-b", str(folders[0]), "-m", str(folders[1]), str(folders[2]), "-o", str(output)]
    result = CliRunner().invoke(cli, arguments)
    assert result.exit_code == 2
    assert "exists and is not empty" in result.output
    # Nothing is read ahead for a merge that its output check rejects.
    assert begun == []
    result = CliRunner().invoke(cli, [*arguments, "--force"])
    assert result.exit_code == 0, result.output
    assert len(begun) == 1
