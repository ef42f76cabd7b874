"""Whole recipes against mergekit 0.1.5's own `run_merge` on the same tiny checkpoints.

These compare every output tensor, float32, tolerance 1e-6: parameter resolution
(filters, layer gradients, top-level defaults), the kernels and the tensor plan.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file

from mergekit_ext.engine import MergeOptions, run_recipe
from mergekit_ext.recipe import parse_recipe

mergekit = pytest.importorskip("mergekit", reason="mergekit 0.1.5 (the peer extra) is not installed")

pytestmark = pytest.mark.peer

ModelFactory = Callable[..., list[Path]]


def run_mergekit(data: dict[str, Any], output: Path) -> dict[str, torch.Tensor]:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions as PeerOptions

    os.environ["HF_HUB_OFFLINE"] = "1"
    config = MergeConfiguration.model_validate(yaml.safe_load(yaml.safe_dump(data)))
    run_merge(
        config,
        str(output),
        PeerOptions(copy_tokenizer=False, write_model_card=False, quiet=True, random_seed=0),
    )
    return load_file(str(output / "model.safetensors"))


def run_ours(data: dict[str, Any], output: Path) -> dict[str, torch.Tensor]:
    run_recipe(parse_recipe(data), MergeOptions(output=output))
    return load_file(str(output / "model.safetensors"))


def recipes(models: list[Path]) -> dict[str, dict[str, Any]]:
    base, first, second, third = (str(path) for path in models)
    return {
        "ties-gradient-filter": {
            "merge_method": "ties",
            "base_model": base,
            "models": [
                {"model": first, "parameters": {"weight": [0.2, 1.0], "density": 0.5}},
                {
                    "model": second,
                    "parameters": {"weight": [{"filter": "mlp", "value": 0.7}, {"value": 0.3}], "density": 0.7},
                },
                {"model": third, "parameters": {"weight": 0.5, "density": [0.9, 0.3]}},
            ],
            "parameters": {"normalize": True, "lambda": 1.2},
            "dtype": "float32",
        },
        "ties-unnormalized": {
            "merge_method": "ties",
            "base_model": base,
            "models": [{"model": first}, {"model": second}, {"model": third}],
            "parameters": {"density": 0.3, "weight": 0.6, "normalize": False},
            "dtype": "float32",
        },
        "task-arithmetic": {
            "merge_method": "task_arithmetic",
            "base_model": base,
            "models": [
                {"model": first, "parameters": {"weight": 0.3}},
                {"model": second, "parameters": {"weight": [{"filter": "self_attn", "value": -0.4}, {"value": 0.8}]}},
            ],
            "parameters": {"lambda": 0.9},
            "dtype": "float32",
        },
        "linear": {
            "merge_method": "linear",
            "models": [
                {"model": base, "parameters": {"weight": 1.0}},
                {"model": first, "parameters": {"weight": [0.0, 2.0]}},
                {"model": second, "parameters": {"weight": 0.5}},
            ],
            "dtype": "float32",
        },
        "slerp": {
            "merge_method": "slerp",
            "base_model": base,
            "models": [{"model": base}, {"model": first}],
            "parameters": {"t": [{"filter": "mlp", "value": [0.1, 0.9]}, {"value": 0.4}]},
            "dtype": "float32",
        },
    }


@pytest.mark.parametrize(
    "name", ["ties-gradient-filter", "ties-unnormalized", "task-arithmetic", "linear", "slerp"]
)
def test_recipe_matches_mergekit(tiny_models: ModelFactory, tmp_path: Path, name: str) -> None:
    models = tiny_models(4, num_layers=3)
    data = recipes(models)[name]
    theirs = run_mergekit(data, tmp_path / "mergekit-out")
    ours = run_ours(data, tmp_path / "ours-out")
    assert sorted(ours) == sorted(theirs)
    for tensor_name, expected in theirs.items():
        assert ours[tensor_name].dtype == expected.dtype, tensor_name
        assert torch.allclose(ours[tensor_name], expected, atol=1e-6, rtol=0), tensor_name
