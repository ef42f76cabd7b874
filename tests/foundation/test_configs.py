"""Every recipe in configs/ runs as shipped (on the small text zoo) and merges something real."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from mergekit_ext.engine import MergeOptions, run_recipe
from mergekit_ext.methods import METHODS
from mergekit_ext.recipe import parse_recipe

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
METHOD_CONFIGS = sorted(path for path in CONFIGS.glob("*.yaml") if not path.name.startswith("evo_"))


def test_one_config_per_method() -> None:
    methods = {yaml.safe_load(path.read_text())["merge_method"] for path in METHOD_CONFIGS}
    assert methods == set(METHODS)


@pytest.mark.parametrize("path", METHOD_CONFIGS, ids=lambda path: path.stem)
def test_config_runs_on_small_zoo(path: Path, small_text_zoo: object, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    zoo_path = small_text_zoo.path
    monkeypatch.setattr("mergekit_ext.zoo.text.default_zoo_dir", lambda small=False: zoo_path)
    data = yaml.safe_load(path.read_text().replace("zoo:text/", "zoo:text-small/"))
    report = run_recipe(parse_recipe(data), MergeOptions(output=tmp_path / "out", seed=1))
    assert report.tensors > 50

    merged = load_file(str(tmp_path / "out" / "model.safetensors"))
    first_input = data.get("base_model") or data["models"][0]["model"]
    task = first_input.split("/", 1)[1]
    source_folder = zoo_path / "base" if task == "base" else zoo_path / "tasks" / task / "model"
    source = load_file(str(source_folder / "model.safetensors"))
    changed = [name for name, tensor in merged.items() if not torch.equal(tensor, source[name])]
    assert changed, f"{path.name} left {first_input} unchanged"
    assert (tmp_path / "out" / "tokenizer.json").exists()
