"""The rehearsal: a small made-up merge that loads the method's code while the first inputs are read."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mergekit_ext import engine
from mergekit_ext.engine import REHEARSAL_ELEMENTS, MergeOptions
from mergekit_ext.methods import get_method
from mergekit_ext.methods.base import TensorMergeInput
from mergekit_ext.recipe import Recipe, parse_recipe
from mergekit_ext.tiny import write_tiny_checkpoint


def ties_recipe(folders: list[Path], with_base: bool = True) -> Recipe:
    models = folders[1:] if with_base else folders
    return parse_recipe(
        {
            "merge_method": "ties" if with_base else "linear",
            **({"base_model": str(folders[0])} if with_base else {}),
            "models": [{"model": str(folder), "parameters": {"weight": 0.5, "density": 0.3}} for folder in models],
            "parameters": {"lambda": 0.8} if with_base else {},
        }
    )


def planned(recipe: Recipe, tmp_path: Path) -> tuple[list[engine._TensorPlan], engine._Inputs]:
    method = get_method(recipe.merge_method)
    inputs = engine._open_inputs(recipe, method, MergeOptions(output=tmp_path / "out"))
    return engine._plan(recipe, method, inputs, None, False), inputs


def test_example_mirrors_first_large_tensor(tmp_path: Path) -> None:
    folders = [
        write_tiny_checkpoint(tmp_path / f"m{index}", seed=index, hidden=64, vocab_size=4096, dtype=torch.bfloat16)
        for index in range(3)
    ]
    plan, inputs = planned(ties_recipe(folders), tmp_path)
    first_large = next(item for item in plan if item.mergeable and torch.Size(item.shape).numel() >= REHEARSAL_ELEMENTS)
    example = engine._rehearsal(plan, inputs, get_method("ties"), torch.device("cpu"), seed=3)
    assert example is not None
    assert example.name == first_large.name
    # The trailing dimension is kept, and the rows are cut to just over REHEARSAL_ELEMENTS entries.
    assert first_large.shape[1:] == (64,)
    assert example.base is not None
    assert example.base.shape == (REHEARSAL_ELEMENTS // 64, 64)
    # TIES takes bf16 inputs as stored, so the example is bf16 too.
    assert [tensor.dtype for tensor in [example.base, *example.models]] == [torch.bfloat16] * 3
    assert example.model_parameters == first_large.model_parameters
    assert example.parameters == first_large.parameters == {"lambda": 0.8, "normalize": 1.0, "rescale": 0.0, "int8_mask": 0.0}
    # The models differ from the base, so TIES selects entries as it does on real task vectors.
    assert all(not torch.equal(model, example.base) for model in example.models)


def test_example_for_float32_method(tmp_path: Path) -> None:
    folders = [
        write_tiny_checkpoint(tmp_path / f"m{index}", seed=index, hidden=64, vocab_size=4096, dtype=torch.bfloat16)
        for index in range(2)
    ]
    plan, inputs = planned(ties_recipe(folders, with_base=False), tmp_path)
    method = get_method("linear")
    example = engine._rehearsal(plan, inputs, method, torch.device("cpu"), seed=0)
    assert example is not None
    assert example.base is None
    assert [tensor.dtype for tensor in example.models] == [engine._merge_dtype(torch.bfloat16, method)] * 2


def test_no_rehearsal_for_small_tensors(tmp_path: Path) -> None:
    folders = [write_tiny_checkpoint(tmp_path / f"m{index}", seed=index) for index in range(3)]
    plan, inputs = planned(ties_recipe(folders), tmp_path)
    assert engine._rehearsal(plan, inputs, get_method("ties"), torch.device("cpu"), seed=0) is None


class FailingMethod:
    """A method whose merge always fails, standing in for inputs a method rejects."""

    name = "failing"
    stored_dtype_inputs = True

    def merge(self, inputs: TensorMergeInput) -> torch.Tensor:
        raise ValueError("inputs rejected")


def test_failed_rehearsal_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    folders = [
        write_tiny_checkpoint(tmp_path / f"m{index}", seed=index, hidden=64, vocab_size=4096, dtype=torch.bfloat16)
        for index in range(3)
    ]
    plan, inputs = planned(ties_recipe(folders), tmp_path)
    with caplog.at_level(logging.DEBUG, logger="mergekit_ext.engine"):
        engine._rehearse(plan, inputs, FailingMethod(), torch.device("cpu"), seed=0)  # type: ignore[arg-type]
    assert "the rehearsal merge failed (inputs rejected)" in caplog.text


def test_rehearsal_loads_fused_kernels(tmp_path: Path) -> None:
    pytest.importorskip("numba")
    folders = [
        write_tiny_checkpoint(tmp_path / f"m{index}", seed=index, hidden=64, vocab_size=4096, dtype=torch.bfloat16)
        for index in range(4)
    ]
    # A fresh process, so no earlier merge has loaded the kernels.
    code = f"""
import torch
from pathlib import Path
from mergekit_ext import engine
from mergekit_ext.methods import fused, get_method
from tests.foundation.test_rehearsal import planned, ties_recipe
assert not fused.loaded()
plan, inputs = planned(ties_recipe([Path(p) for p in {[str(folder) for folder in folders]!r}]), Path({str(tmp_path)!r}))
engine._rehearse(plan, inputs, get_method("ties"), torch.device("cpu"), 0)
from mergekit_ext.methods import fused_numba
assert fused.loaded()
# The kernels the real merge of 3 bf16 models calls, compiled for its argument types.
for kernel in (fused_numba.band, fused_numba.consensus, fused_numba.magnitudes_at):
    assert kernel.signatures, kernel
assert any(len(signature[1]) == 3 for signature in fused_numba.consensus.signatures)
"""
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[2])
