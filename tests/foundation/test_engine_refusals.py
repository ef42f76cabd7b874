"""The engine checks every input before writing and leaves no output behind on failure."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mergekit_ext.engine import MergeOptions, run_recipe
from mergekit_ext.errors import (
    CheckpointError,
    IncompatibleModelsError,
    InvalidTensorError,
    OutputError,
    RecipeError,
)
from mergekit_ext.recipe import parse_recipe

from .conftest import leftover_partials

ModelFactory = Callable[..., list[Path]]


def ties_recipe(base: Path, models: list[Path], **parameters: object) -> object:
    return parse_recipe(
        {
            "merge_method": "ties",
            "base_model": str(base),
            "models": [{"model": str(path)} for path in models],
            "parameters": {"density": 0.5, **parameters},
        }
    )


def edit_tensor(folder: Path, name: str, value: torch.Tensor | None) -> None:
    state = load_file(str(folder / "model.safetensors"))
    if value is None:
        del state[name]
    else:
        state[name] = value
    save_file(state, str(folder / "model.safetensors"))


def assert_no_output(tmp_path: Path) -> None:
    assert not (tmp_path / "out").exists()
    assert leftover_partials(tmp_path) == []


def test_missing_tensor_is_named(tiny_models: ModelFactory, tmp_path: Path) -> None:
    base, first, second = tiny_models(3)
    edit_tensor(second, "model.layers.1.mlp.up_proj.weight", None)
    with pytest.raises(IncompatibleModelsError) as error:
        run_recipe(ties_recipe(base, [first, second]), MergeOptions(output=tmp_path / "out"))
    assert "model.layers.1.mlp.up_proj.weight" in str(error.value)
    assert str(second) in str(error.value)
    assert_no_output(tmp_path)


def test_shape_mismatch_names_both_shapes(tiny_models: ModelFactory, tmp_path: Path) -> None:
    base, first, second = tiny_models(3)
    edit_tensor(first, "model.layers.0.mlp.up_proj.weight", torch.zeros(8, 16))
    with pytest.raises(IncompatibleModelsError) as error:
        run_recipe(ties_recipe(base, [first, second]), MergeOptions(output=tmp_path / "out"))
    message = str(error.value)
    assert "(32, 16)" in message
    assert "(8, 16)" in message
    assert_no_output(tmp_path)


def test_vocabulary_mismatch_and_truncation(tmp_path: Path) -> None:
    from mergekit_ext.tiny import write_tiny_checkpoint

    base = write_tiny_checkpoint(tmp_path / "base", seed=0, vocab_size=32)
    bigger = write_tiny_checkpoint(tmp_path / "bigger", seed=1, vocab_size=40)
    recipe = parse_recipe(
        {"merge_method": "task_arithmetic", "base_model": str(base), "models": [{"model": str(bigger)}]}
    )
    with pytest.raises(IncompatibleModelsError, match="--truncate-vocab") as error:
        run_recipe(recipe, MergeOptions(output=tmp_path / "out"))
    assert "32" in str(error.value)
    assert "40" in str(error.value)
    assert_no_output(tmp_path)

    run_recipe(recipe, MergeOptions(output=tmp_path / "out", truncate_vocab=True))
    merged = load_file(str(tmp_path / "out" / "model.safetensors"))
    bigger_state = load_file(str(bigger / "model.safetensors"))
    name = "model.embed_tokens.weight"
    assert merged[name].shape == (32, 16)
    assert torch.allclose(merged[name], bigger_state[name][:32], atol=1e-7)
    assert torch.allclose(merged["lm_head.weight"], bigger_state["lm_head.weight"][:32], atol=1e-7)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_input_is_named(tiny_models: ModelFactory, tmp_path: Path, bad: float) -> None:
    base, first, second = tiny_models(3)
    value = torch.zeros(16)
    value[3] = bad
    edit_tensor(second, "model.norm.weight", value)
    with pytest.raises(InvalidTensorError) as error:
        run_recipe(ties_recipe(base, [first, second]), MergeOptions(output=tmp_path / "out"))
    assert "model.norm.weight" in str(error.value)
    assert str(second) in str(error.value)
    assert_no_output(tmp_path)


def huge_inputs(tmp_path: Path, deltas: list[float]) -> tuple[Path, list[Path]]:
    """Write a float32 base with -2e38 at entry (0, 0) of a zero matrix, and one model per delta added to that entry."""
    folders = []
    for index, delta in enumerate([0.0, *deltas]):
        folder = tmp_path / f"input-{index}"
        folder.mkdir()
        weight = torch.zeros(6, 4)
        weight[0, 0] = -2e38 + delta
        save_file({"layer.weight": weight}, str(folder / "model.safetensors"))
        folders.append(folder)
    return folders[0], folders[1:]


def subspace_recipe(method: str, base: Path, models: list[Path]) -> object:
    return parse_recipe(
        {"merge_method": method, "base_model": str(base), "models": [{"model": str(path)} for path in models]}
    )


@pytest.mark.parametrize("method", ["tsv", "iso_c", "iso_cts"])
def test_overflowing_task_vector_is_named(tmp_path: Path, method: str) -> None:
    # Model 1 contains a finite 2e38 (-2e38 + 4e38), but its difference from the base's -2e38 overflows.
    base, models = huge_inputs(tmp_path, [1.0, 4e38])
    with pytest.raises(InvalidTensorError) as error:
        run_recipe(subspace_recipe(method, base, models), MergeOptions(output=tmp_path / "out"))
    assert "'layer.weight'" in str(error.value)
    assert f"of {models[1]} differs from the base" in str(error.value)
    assert_no_output(tmp_path)


def test_failed_decomposition_is_one_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mergekit_ext.methods import iso

    def failing(deltas: list[torch.Tensor]) -> torch.Tensor:
        raise torch.linalg.LinAlgError("linalg.svd: The algorithm failed to converge")

    monkeypatch.setattr(iso, "iso_c_merge", failing)
    base, models = huge_inputs(tmp_path, [1.0, 2.0])
    with pytest.raises(InvalidTensorError) as error:
        run_recipe(subspace_recipe("iso_c", base, models), MergeOptions(output=tmp_path / "out"))
    assert "merging tensor 'layer.weight' with iso_c failed" in str(error.value)
    assert "failed to converge" in str(error.value)
    assert_no_output(tmp_path)


@pytest.mark.parametrize(("dtype", "value", "wider"), [(torch.float64, 1e300, True), (torch.bfloat16, float("nan"), False)])
def test_float32_overflow_is_mentioned_for_float64(
    tmp_path: Path, dtype: torch.dtype, value: float, wider: bool
) -> None:
    folders = []
    for index in range(3):
        folder = tmp_path / f"input-{index}"
        folder.mkdir()
        weight = torch.full((4, 4), 0.5 * index, dtype=dtype)
        if index == 2:
            weight[1, 1] = value
        save_file({"layer.weight": weight}, str(folder / "model.safetensors"))
        folders.append(folder)
    recipe = parse_recipe({"merge_method": "linear", "models": [{"model": str(path), "parameters": {"weight": 1.0}} for path in folders]})
    with pytest.raises(InvalidTensorError) as error:
        run_recipe(recipe, MergeOptions(output=tmp_path / "out"))
    assert f"'layer.weight' in {folders[2]} contains NaN or Inf values" in str(error.value)
    assert ("too large for float32" in str(error.value)) == wider
    assert_no_output(tmp_path)


def test_existing_output_needs_force(tiny_models: ModelFactory, tmp_path: Path) -> None:
    base, first, second = tiny_models(3)
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(OutputError, match="--force"):
        run_recipe(ties_recipe(base, [first, second]), MergeOptions(output=out))
    assert (out / "notes.txt").read_text() == "keep me"
    run_recipe(ties_recipe(base, [first, second]), MergeOptions(output=out, force=True))
    assert (out / "model.safetensors").exists()
    assert not (out / "notes.txt").exists()


def test_output_equal_to_input_is_refused(tiny_models: ModelFactory, tmp_path: Path) -> None:
    base, first, second = tiny_models(3)
    before = (first / "model.safetensors").read_bytes()
    with pytest.raises(OutputError, match="overlaps the input"):
        run_recipe(ties_recipe(base, [first, second]), MergeOptions(output=first, force=True))
    assert (first / "model.safetensors").read_bytes() == before


def test_inputs_are_never_modified(tiny_models: ModelFactory, tmp_path: Path) -> None:
    models = tiny_models(3)
    before = {path: (path / "model.safetensors").read_bytes() for path in models}
    run_recipe(ties_recipe(models[0], models[1:]), MergeOptions(output=tmp_path / "out"))
    for path, data in before.items():
        assert (path / "model.safetensors").read_bytes() == data


def test_unknown_parameter_names_the_key(tiny_models: ModelFactory, tmp_path: Path) -> None:
    base, first, second = tiny_models(3)
    with pytest.raises(RecipeError, match="'densty'"):
        run_recipe(ties_recipe(base, [first, second], densty=0.3), MergeOptions(output=tmp_path / "out"))
    assert_no_output(tmp_path)


def test_missing_base_for_ties(tiny_models: ModelFactory, tmp_path: Path) -> None:
    _, first, second = tiny_models(3)
    recipe = parse_recipe({"merge_method": "ties", "models": [{"model": str(first)}, {"model": str(second)}]})
    with pytest.raises(RecipeError, match="needs a base model"):
        run_recipe(recipe, MergeOptions(output=tmp_path / "out"))


def test_missing_model_folder(tiny_models: ModelFactory, tmp_path: Path) -> None:
    base, first, _ = tiny_models(3)
    with pytest.raises(CheckpointError, match="not found"):
        run_recipe(ties_recipe(base, [first, tmp_path / "absent"]), MergeOptions(output=tmp_path / "out"))
    assert_no_output(tmp_path)


def test_other_methods_parameter_is_ignored(tiny_models: ModelFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    base, first, second = tiny_models(3)
    data = {
        "merge_method": "task_arithmetic",
        "base_model": str(base),
        "models": [{"model": str(first), "parameters": {"density": 0.5}}, {"model": str(second)}],
    }
    run_recipe(parse_recipe(data), MergeOptions(output=tmp_path / "with"))
    del data["models"][0]["parameters"]
    run_recipe(parse_recipe(data), MergeOptions(output=tmp_path / "without"))
    assert "'density' is not a parameter of 'task_arithmetic'" in caplog.text
    with_density = load_file(str(tmp_path / "with" / "model.safetensors"))
    without_density = load_file(str(tmp_path / "without" / "model.safetensors"))
    for name, tensor in with_density.items():
        assert torch.equal(tensor, without_density[name]), name


def test_out_of_range_density_fails_in_planning(tiny_models: ModelFactory, tmp_path: Path) -> None:
    base, first, second = tiny_models(3)
    recipe = parse_recipe(
        {
            "merge_method": "ties",
            "base_model": str(base),
            "models": [{"model": str(first)}, {"model": str(second), "parameters": {"density": 1.5}}],
        }
    )
    progress_calls: list[int] = []

    def progress(done: int, total: int, name: str) -> None:
        progress_calls.append(done)

    with pytest.raises(RecipeError) as error:
        run_recipe(recipe, MergeOptions(output=tmp_path / "out"), progress=progress)
    message = str(error.value)
    assert "'density'" in message
    assert "model 1" in message
    assert "at most 1.0" in message
    # Planning fails before the merge reports any progress.
    assert progress_calls == []
    assert_no_output(tmp_path)
