"""MASS artifact: shared TSV-M model, θ_Ω merges, LRU cache, two-pass runs, round trip, refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tests.mass.mass_tiny_models import perturb_checkpoint, write_heads, write_tiny_bert
from safetensors.torch import load_file, save_file
from torch.func import functional_call

from mergekit_ext.errors import CheckpointError, IncompatibleModelsError, RecipeError
from mergekit_ext.mass.build import MassBuildOptions, build_mass_artifact
from mergekit_ext.mass.config import CONFIG_NAME, MassConfig
from mergekit_ext.mass.evaluation import _deduplicated_second_pass
from mergekit_ext.mass.router import RouterSettings
from mergekit_ext.mass.runtime import MassModel, MassOutput, _select_head
from mergekit_ext.mass.task_store import MergedModelCache
from mergekit_ext.methods import get_method
from mergekit_ext.methods.base import TensorMergeInput
from mergekit_ext.models.adapters import ModelBatch
from mergekit_ext.models.router_site import find_router_site

TEXTS = ["alpha beta", "river stone cloud", "quick brown fox green", "seven", "gamma delta river fox"]


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def test_shared_model_equals_tsv_method(tiny_mass) -> None:
    shared = _tensors(tiny_mass.artifact)
    base = _tensors(tiny_mass.base)
    models = [_tensors(m) for m in tiny_mass.models]
    tsv = get_method("tsv")
    for name in ("encoder.layer.1.attention.self.query.weight", "encoder.layer.2.intermediate.dense.weight",
                 "encoder.layer.0.output.LayerNorm.weight", "embeddings.token_type_embeddings.weight"):
        expected = tsv.merge(TensorMergeInput(name=name, base=base[name], models=[m[name] for m in models]))
        torch.testing.assert_close(shared[name], expected, atol=1e-5, rtol=1e-5, msg=name)


def test_config_records_router_and_storage(tiny_mass) -> None:
    config = MassConfig.load(tiny_mass.artifact)
    assert config.task_names == ["first", "second", "third"]
    assert config.router.site == "encoder.layer.2.intermediate.dense"
    assert config.router.token_rule == "mean"
    assert (config.router.threshold, config.router.top_k, config.router.temperature) == (0.2, 3, 1.0)
    assert config.has_heads
    factor_bytes = sum(p.stat().st_size for p in (tiny_mass.artifact / "mass").glob("task_*.safetensors"))
    assert config.storage.factor_bytes == factor_bytes


def test_factor_file_layout(tiny_mass) -> None:
    factors = load_file(str(tiny_mass.artifact / "mass" / "task_00.safetensors"))
    name = "encoder.layer.0.intermediate.dense.weight"  # 64 × 32, three tasks: k = 10
    assert factors[f"{name}.u"].shape == (64, 10)
    assert factors[f"{name}.s"].shape == (10,)
    assert factors[f"{name}.vh"].shape == (10, 32)
    # token_type_embeddings is 2 × 32: ⌊2 / 3⌋ = 0, so the whole task vector is stored
    assert factors["embeddings.token_type_embeddings.weight.delta"].shape == (2, 32)


def test_base_is_recovered_from_shared(tiny_mass) -> None:
    model = MassModel.from_pretrained(tiny_mass.artifact, device="cpu")
    base = _tensors(tiny_mass.base)
    for name, tensor in model.store.base.items():
        torch.testing.assert_close(tensor, base[name], atol=2e-6, rtol=1e-5, msg=name)


def test_single_task_set_is_rank_k_model(tiny_mass) -> None:
    model = MassModel.from_pretrained(tiny_mass.artifact, device="cpu")
    base = _tensors(tiny_mass.base)
    second = _tensors(tiny_mass.models[1])
    merged = model.store.merge((1,))
    name = "encoder.layer.3.attention.output.dense.weight"
    u, s, vh = torch.linalg.svd(second[name] - base[name], full_matrices=False)
    expected = base[name] + (u[:, :10] * s[:10]) @ vh[:10]
    torch.testing.assert_close(merged[name], expected, atol=1e-5, rtol=1e-5)
    bias = "encoder.layer.3.attention.output.dense.bias"
    torch.testing.assert_close(merged[bias], second[bias], atol=1e-6, rtol=1e-6)


def test_all_task_set_is_shared_model(tiny_mass) -> None:
    model = MassModel.from_pretrained(tiny_mass.artifact, device="cpu")
    shared = _tensors(tiny_mass.artifact)
    merged = model.store.merge((0, 1, 2))
    for name, tensor in merged.items():
        torch.testing.assert_close(tensor, shared[name], atol=1e-5, rtol=1e-5, msg=name)


def test_cache_stores_and_evicts(tiny_mass) -> None:
    model = MassModel.from_pretrained(tiny_mass.artifact, device="cpu")
    cache = MergedModelCache(model.store, capacity=2)
    first = cache.get((0,))
    assert cache.get((0,)) is first
    cache.get((2, 1))
    assert (1, 2) in cache
    cache.get((0,))  # (0,) becomes the most recently used entry
    cache.get((0, 2))  # evicts (1, 2)
    assert (1, 2) not in cache
    assert (0,) in cache
    assert len(cache) == 2
    assert (cache.hits, cache.misses) == (2, 3)


def test_run_groups_samples_by_task_set(tiny_mass) -> None:
    model = MassModel.from_pretrained(tiny_mass.artifact, device="cpu", mode="top1")
    # Random task vectors barely differ at the router site; one-dimensional subspaces
    # along three activation directions send the five texts to different tasks.
    features, _ = model.router_features(model.adapter.prepare(TEXTS))
    model.bases = [torch.nn.functional.normalize(features[i : i + 1], dim=1) for i in (0, 1, 2)]
    output = model.run(TEXTS)
    assert output.task_sets[:3] == [(0,), (1,), (2,)]
    for row, text in enumerate(TEXTS):
        batch = model.adapter.prepare([text])
        parameters = model.merged_parameters(output.task_sets[row])
        with torch.inference_mode():
            expected = functional_call(model.adapter, parameters, (batch,), strict=False)
        torch.testing.assert_close(output.features[row], expected[0], atol=1e-5, rtol=1e-4)
    assert model.cache.misses == len(set(output.task_sets))


def block_one_mlp_input(model: MassModel, batch: ModelBatch) -> torch.Tensor:
    """Run the shared model and return the input of block 1's first MLP linear, read by a hook."""
    recorded = {}
    handle = model.adapter.model.encoder.layer[1].intermediate.dense.register_forward_pre_hook(
        lambda module, args: recorded.setdefault("x", args[0])
    )
    with torch.inference_mode():
        model.adapter(batch)
    handle.remove()
    return recorded["x"]


def test_routing_uses_hooked_block_input(tiny_mass) -> None:
    model = MassModel.from_pretrained(tiny_mass.artifact, device="cpu", router_layer=1)
    assert model.router_site == "encoder.layer.1.intermediate.dense"
    batch = model.adapter.prepare(TEXTS)
    hooked = block_one_mlp_input(model, batch)
    mask = batch.token_mask.unsqueeze(-1).float()
    expected = (hooked * mask).sum(dim=1) / mask.sum(dim=1)
    features, _ = model.router_features(batch)
    torch.testing.assert_close(features, expected)
    factors = model.store.tasks[0].low_rank["encoder.layer.1.intermediate.dense.weight"]
    assert torch.equal(model.bases[0], factors.vh)


def test_content_token_rule_skips_special_tokens(tiny_mass) -> None:
    model = MassModel.from_pretrained(tiny_mass.artifact, device="cpu", router_layer=1, token_rule="content")
    batch = model.adapter.prepare(TEXTS)
    hooked = block_one_mlp_input(model, batch)
    ids = batch.inputs["input_ids"]
    tokenizer = model.adapter.tokenizer
    markers = torch.tensor([tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id])
    content = (batch.inputs["attention_mask"].bool() & ~torch.isin(ids, markers)).unsqueeze(-1).float()
    assert bool((content.sum(dim=1) < batch.token_mask.sum(dim=1, keepdim=True)).all())  # [CLS] and [SEP] dropped
    expected = (hooked * content).sum(dim=1) / content.sum(dim=1)
    features, _ = model.router_features(batch)
    torch.testing.assert_close(features, expected)


def test_stored_token_rule_is_applied(tiny_mass, tmp_path: Path) -> None:
    artifact = tmp_path / "cls"
    options = MassBuildOptions(device="cpu", router_layer=2, token_rule="cls")
    build_mass_artifact(tiny_mass.base, tiny_mass.models, artifact, heads=tiny_mass.heads, options=options)
    model = MassModel.from_pretrained(artifact, device="cpu")
    assert model.adapter.token_rule == "cls"
    with pytest.raises(RecipeError, match="token rule 'first'"):
        MassModel.from_pretrained(artifact, device="cpu", token_rule="first")


def test_pass_one_stops_at_router_block(tiny_mass) -> None:
    model = MassModel.from_pretrained(tiny_mass.artifact, device="cpu")
    calls = []
    handle = model.adapter.model.encoder.layer[3].register_forward_hook(lambda *args: calls.append(1))
    model.router_features(model.adapter.prepare(TEXTS))
    handle.remove()
    assert calls == []


def test_reuse_prefix_with_all_tasks_equals_shared(tiny_mass) -> None:
    settings = {"threshold": 0.01, "top_k": 3}
    faithful = MassModel.from_pretrained(tiny_mass.artifact, device="cpu", **settings)
    reused = MassModel.from_pretrained(tiny_mass.artifact, device="cpu", reuse_prefix=True, **settings)
    output = reused.run(TEXTS)
    assert set(output.task_sets) == {(0, 1, 2)}
    torch.testing.assert_close(output.features, faithful.shared_features(TEXTS), atol=1e-5, rtol=1e-4)


def test_reuse_prefix_runs_late_blocks_with_merged_weights(tiny_mass) -> None:
    model = MassModel.from_pretrained(tiny_mass.artifact, device="cpu", reuse_prefix=True, mode="top1")
    output = model.run(TEXTS)
    late = ("encoder.layer.2.", "encoder.layer.3.", "pooler.")
    for row, text in enumerate(TEXTS):
        parameters = {
            name: tensor for name, tensor in model.merged_parameters(output.task_sets[row]).items()
            if name.removeprefix("model.").startswith(late)
        }  # fmt: skip
        with torch.inference_mode():
            expected = functional_call(model.adapter, parameters, (model.adapter.prepare([text]),), strict=False)
        torch.testing.assert_close(output.features[row], expected[0], atol=1e-5, rtol=1e-4)


def test_round_trip_gives_identical_outputs(tiny_mass, tmp_path: Path) -> None:
    first = MassModel.from_pretrained(tiny_mass.artifact, device="cpu")
    copy = tmp_path / "copy"
    import shutil

    shutil.copytree(tiny_mass.artifact, copy)
    second = MassModel.from_pretrained(copy, device="cpu")
    first_logits = first.task_logits(TEXTS, first.task_names)
    second_logits = second.task_logits(TEXTS, second.task_names)
    for task in first.task_names:
        assert torch.equal(first_logits[task], second_logits[task])


def test_task_logits_masks_unselected_tasks(tiny_mass) -> None:
    model = MassModel.from_pretrained(tiny_mass.artifact, device="cpu", mode="top1")
    logits = model.task_logits(TEXTS, model.task_names)
    output = model.run(TEXTS)
    for row, task_set in enumerate(output.task_sets):
        for index, task in enumerate(model.task_names):
            finite = bool(torch.isfinite(logits[task][row]).all())
            assert finite == (index in task_set)


def test_head_selection_by_max_logit() -> None:
    logits = [torch.tensor([[1.0, 5.0], [0.0, 0.5]]), torch.tensor([[4.0, 2.0, 0.0], [3.0, 0.0, 9.0]])]
    output = MassOutput(features=torch.zeros(2, 1), decision=None, task_sets=[(0, 1), (0, 1)])  # type: ignore[arg-type]
    prediction = _select_head(logits, output)
    assert prediction.task_index.tolist() == [0, 1]
    assert prediction.class_index.tolist() == [1, 2]


def test_batch_routing_uses_one_task_set(tiny_mass) -> None:
    model = MassModel.from_pretrained(tiny_mass.artifact, device="cpu", routing="batch")
    output = model.run(TEXTS)
    assert len(set(output.task_sets)) == 1


def test_router_settings_override(tiny_mass) -> None:
    model = MassModel.from_pretrained(tiny_mass.artifact, device="cpu", threshold=0.3, top_k=2, mode="top1")
    assert model.settings == RouterSettings(temperature=1.0, threshold=0.3, top_k=2, mode="top1")


def test_router_rank_keeps_top_singular_vectors(tiny_mass, tmp_path: Path) -> None:
    full = MassModel.from_pretrained(tiny_mass.artifact, device="cpu")
    reduced = MassModel.from_pretrained(tiny_mass.artifact, device="cpu", router_rank=2)
    for basis, top in zip(full.bases, reduced.bases):
        assert top.shape[0] == 2
        assert torch.equal(top, basis[:2])  # vh rows come in decreasing singular value order
    batch = reduced.adapter.prepare(TEXTS)
    features, _ = reduced.router_features(batch)
    decision, _ = reduced.route(batch)
    expected = torch.stack([(features - features @ b.T @ b).norm(dim=1) for b in reduced.bases], dim=1)
    torch.testing.assert_close(decision.residuals, expected, atol=1e-4, rtol=1e-4)
    # θ_Ω is unchanged: the router rank only affects the choice of Ω.
    for name, tensor in reduced.merged_parameters((0, 1)).items():
        assert torch.equal(tensor, full.merged_parameters((0, 1))[name])

    stored = tmp_path / "stored"
    options = MassBuildOptions(device="cpu", router_layer=2, router_rank=3)
    build_mass_artifact(tiny_mass.base, tiny_mass.models, stored, heads=tiny_mass.heads, options=options)
    assert MassConfig.load(stored).router.rank == 3
    assert MassModel.from_pretrained(stored, device="cpu").bases[0].shape[0] == 3
    with pytest.raises(RecipeError, match="router-rank 0"):
        build_mass_artifact(tiny_mass.base, tiny_mass.models, tmp_path / "bad", options=MassBuildOptions(device="cpu", router_rank=0))
    assert not (tmp_path / "bad").exists()


def test_build_rejects_single_task(tiny_mass, tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="at least two"):
        build_mass_artifact(tiny_mass.base, tiny_mass.models[:1], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_build_rejects_different_shapes(tiny_mass, tmp_path: Path) -> None:
    other = write_tiny_bert(tmp_path / "wide", layers=4)
    tensors = _tensors(other)
    tensors["encoder.layer.0.intermediate.dense.weight"] = torch.zeros(48, 32)
    save_file(tensors, str(other / "model.safetensors"))
    with pytest.raises(IncompatibleModelsError, match="encoder.layer.0.intermediate.dense.weight"):
        build_mass_artifact(tiny_mass.base, [tiny_mass.models[0], other], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_build_rejects_mismatched_heads(tiny_mass, tmp_path: Path) -> None:
    heads = write_heads(tmp_path / "heads", 2, 32)
    wrong = write_heads(tmp_path / "wrong", 1, 16)
    with pytest.raises(IncompatibleModelsError, match="feature sizes"):
        build_mass_artifact(tiny_mass.base, tiny_mass.models[:2], tmp_path / "out", heads=[heads[0], wrong[0]])
    wrong_both = write_heads(tmp_path / "wrong_both", 2, 16)
    with pytest.raises(IncompatibleModelsError, match="32 dimensions"):
        build_mass_artifact(tiny_mass.base, tiny_mass.models[:2], tmp_path / "out", heads=wrong_both)
    assert not (tmp_path / "out").exists()


def test_build_rejects_missing_router_site(tmp_path: Path) -> None:
    base = write_tiny_bert(tmp_path / "base", layers=2)
    for folder in (base,):
        tensors = {k.replace("intermediate.dense", "intermediate.linear"): v for k, v in _tensors(folder).items()}
        save_file(tensors, str(folder / "model.safetensors"))
    models = [perturb_checkpoint(base, tmp_path / f"m{i}", seed=i) for i in range(2)]
    with pytest.raises(CheckpointError, match="intermediate.dense"):
        build_mass_artifact(base, models, tmp_path / "out")


def test_find_router_site_lists_linear_modules() -> None:
    class Block(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.mlp = torch.nn.ModuleDict({"fc1": torch.nn.Linear(2, 2)})

    model = torch.nn.Module()
    model.blocks = torch.nn.ModuleList([Block(), Block()])
    assert find_router_site(model, 1) == ("blocks.1.mlp.fc1", 1)
    with pytest.raises(CheckpointError, match="out of range"):
        find_router_site(model, 5)
    with pytest.raises(CheckpointError, match="intermediate.dense"):
        find_router_site(torch.nn.Sequential(torch.nn.Linear(2, 2)))


def test_load_rejects_missing_config(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=CONFIG_NAME):
        MassModel.from_pretrained(tmp_path, device="cpu")


def test_load_rejects_other_format_version(tiny_mass, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(tiny_mass.artifact, copy)
    config = json.loads((copy / CONFIG_NAME).read_text())
    config["format_version"] = 99
    (copy / CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="format version 99"):
        MassModel.from_pretrained(copy, device="cpu")


def test_redundancy_filter_records_subsets(tiny_mass, tmp_path: Path) -> None:
    duplicate = tmp_path / "duplicate"
    import shutil

    shutil.copytree(tiny_mass.models[0], duplicate)
    result = build_mass_artifact(
        tiny_mass.base, [tiny_mass.models[0], duplicate, tiny_mass.models[1]], tmp_path / "out",
        options=MassBuildOptions(device="cpu", redundancy_epsilon=0.3),
    )  # fmt: skip
    subsets = result.config.shared_task_subsets
    assert subsets["encoder.layer.0.intermediate.dense.weight"] == [0, 2]
    model = MassModel.from_pretrained(tmp_path / "out", device="cpu")
    base = _tensors(tiny_mass.base)
    name = "encoder.layer.0.intermediate.dense.weight"
    torch.testing.assert_close(model.store.base[name], base[name], atol=2e-6, rtol=1e-5)


def test_cli_rejects_single_model(tiny_mass, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from mergekit_ext.cli.main import cli

    arguments = ["mass", "--base", str(tiny_mass.base), "--models", str(tiny_mass.models[0]), "--output", str(tmp_path / "out")]
    result = CliRunner().invoke(cli, arguments)
    assert result.exit_code == 2
    assert "at least two fine-tuned models" in result.output
    assert not (tmp_path / "out").exists()


def test_cli_builds_artifact(tiny_mass, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from mergekit_ext.cli.main import cli

    arguments = ["--device", "cpu", "mass", "--base", str(tiny_mass.base), "--models", *map(str, tiny_mass.models)]
    arguments += ["--task-names", "a", "b", "c", "--router-layer", "1", "--mode", "top1", "--output", str(tmp_path / "out")]
    result = CliRunner().invoke(cli, arguments)
    assert result.exit_code == 0, result.output
    assert "storage factor" in result.output
    config = MassConfig.load(tmp_path / "out")
    assert config.task_names == ["a", "b", "c"]
    assert config.router.layer == 1
    assert config.router.mode == "top1"
    assert not config.has_heads


def test_deduplicated_second_pass(tiny_mass) -> None:
    # Two variants whose task sets agree on some texts (run once) and differ on others.
    model = MassModel.from_pretrained(tiny_mass.artifact, device="cpu")
    batch = model.adapter.prepare(TEXTS)
    sets = {"a": [(0,), (1, 2), (0, 1, 2), (2,), (0, 2)], "b": [(0,), (1,), (0, 1, 2), (0,), (0, 2)]}
    shared = _deduplicated_second_pass(model, batch, sets)
    for label, task_sets in sets.items():
        torch.testing.assert_close(shared[label], model.second_pass(batch, task_sets), atol=1e-5, rtol=1e-5, msg=label)
