"""A merge written into a resident model equals the streaming engine's checkpoint."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from mergekit_ext.engine import MergeOptions, run_recipe
from mergekit_ext.evo.backends import load_model
from mergekit_ext.evo.genome import SearchSpace
from mergekit_ext.evo.merge_memory import ResidentSources, checkpoint_layers, genome_recipe, write_genome_into


@pytest.mark.parametrize(
    ("method", "weights", "genes"),
    [
        ("task_arithmetic", "global", [0.3]),
        ("linear", "global", [0.7]),
        ("ties", "global", [0.6]),
        ("dare_ties", "global", [0.8]),
        ("task_arithmetic", "layer_groups", [0.1, 0.9, 0.4]),
        ("linear", "layer_groups", [0.1, 0.9, 0.4]),
    ],
)
def test_memory_merge_equals_streaming_merge(tiny_models, tmp_path, method, weights, genes):
    space = SearchSpace(
        base_model=str(tiny_models["long"]), models=[str(tiny_models["short"])], method=method, weights=weights,
        layer_groups=2, density=0.5, merge_seed=3,
    )  # fmt: skip
    genome = space.decode(genes)
    model = load_model(space.base_model, torch.device("cpu"), torch.float32)
    write_genome_into(model, genome, ResidentSources(space, torch.device("cpu")))

    recipe = genome_recipe(genome, checkpoint_layers(space.base_model))
    run_recipe(recipe, MergeOptions(output=tmp_path / "merged", seed=space.merge_seed, device="cpu"))
    streamed = load_file(tmp_path / "merged" / "model.safetensors")

    state = model.state_dict()
    assert set(streamed) <= set(state)
    for name, tensor in streamed.items():
        torch.testing.assert_close(state[name], tensor, rtol=0, atol=0, msg=name)


def test_task_arithmetic_single_weight_is_interpolation(tiny_models):
    space = SearchSpace(base_model=str(tiny_models["long"]), models=[str(tiny_models["short"])])
    resident = ResidentSources(space, torch.device("cpu"))
    model = load_model(space.base_model, torch.device("cpu"), torch.float32)
    write_genome_into(model, space.decode([0.25]), resident)
    name = "model.layers.0.mlp.up_proj.weight"
    expected = 0.75 * resident.base[name] + 0.25 * resident.sources[0][name]
    torch.testing.assert_close(model.state_dict()[name], expected, rtol=1e-6, atol=1e-6)


def test_layer_groups_use_their_own_weight(tiny_models):
    space = SearchSpace(base_model=str(tiny_models["long"]), models=[str(tiny_models["short"])],
                        weights="layer_groups", layer_groups=2)
    genome = space.decode([0.0, 1.0, 0.5])
    assert genome.weights_for("model.layers.0.mlp.up_proj.weight", 4) == [0.0]
    assert genome.weights_for("model.layers.3.mlp.up_proj.weight", 4) == [1.0]
    assert genome.weights_for("model.embed_tokens.weight", 4) == [0.5]
