"""Refusal direction (fast and full selection), directional ablation and abliteration.

The instruction lists here are neutral made-up strings that only exercise the
mechanics; they are not a refusal data set.
"""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from mergekit_ext.errors import RecipeError
from mergekit_ext.steer.abliterate import abliterate_checkpoint
from mergekit_ext.steer.ablation import directional_ablation, orthogonalize_embedding, orthogonalize_output_weight
from mergekit_ext.steer.activations import collect_block_outputs
from mergekit_ext.steer.data import load_instructions
from mergekit_ext.steer.extract import encode_texts
from mergekit_ext.steer.refusal import (
    last_token_log_probs,
    refusal_direction_fast,
    refusal_score,
    refusal_token_ids,
    select_refusal_direction,
)
from mergekit_ext.steer.template import PromptTemplate

GROUP_A = ["Paint the fence blue", "Stack the red boxes", "Fold the paper crane", "Sort the old coins"]
GROUP_B = ["Name a calm color", "Count to five slowly", "Describe a round table", "List two fruits", "Say hello"]


def test_fast_direction_is_mean_difference(model, tokenizer):
    template = PromptTemplate.from_chat_template(tokenizer)
    vector = refusal_direction_fast(model, tokenizer, GROUP_A, GROUP_B, [1, 2], template)
    a = collect_block_outputs(model, encode_texts(tokenizer, template, GROUP_A), [2], "last")[2][:, 0]
    b = collect_block_outputs(model, encode_texts(tokenizer, template, GROUP_B), [2], "last")[2][:, 0]
    assert torch.allclose(vector.directions[2], a.mean(0) - b.mean(0), atol=1e-6)
    assert vector.recipe.method == "refusal_mean_difference"
    assert vector.recipe.extra["num_harmless"] == "5"


def test_refusal_score_formula():
    log_probs = torch.log(torch.tensor([[0.2, 0.3, 0.5], [0.9, 0.05, 0.05]], dtype=torch.float64))
    scores = refusal_score(log_probs, [0, 1])
    assert scores[0].item() == pytest.approx(math.log(0.5 / 0.5))
    assert scores[1].item() == pytest.approx(math.log(0.95 / 0.05))


def test_full_selection_picks_lowest_score(model, tokenizer):
    template = PromptTemplate.from_chat_template(tokenizer)
    tokens = refusal_token_ids(tokenizer, ("I", "As"))
    selection = select_refusal_direction(
        model, tokenizer, GROUP_A, GROUP_B, GROUP_A[:2], GROUP_B[:2], template, tokens,
        kl_threshold=float("inf"), require_inducing=False,
    )
    suffix_length = len(template.suffix_ids(tokenizer))
    # The rule drops layers >= 0.8 * 4 = 3.2, so all four layers of this model stay.
    assert {candidate.layer for candidate in selection.candidates} == {0, 1, 2, 3}
    assert len(selection.candidates) == 4 * suffix_length
    best = min(selection.candidates, key=lambda candidate: candidate.refusal_score)
    assert selection.chosen == best
    direction = selection.vector.directions[best.layer]
    with directional_ablation(model, direction):
        ablated = last_token_log_probs(model, encode_texts(tokenizer, template, GROUP_A[:2]))
    assert refusal_score(ablated, tokens).mean().item() == pytest.approx(best.refusal_score, abs=1e-6)


def test_full_selection_filters(model, tokenizer):
    template = PromptTemplate.from_chat_template(tokenizer)
    tokens = refusal_token_ids(tokenizer)
    selection = select_refusal_direction(
        model, tokenizer, GROUP_A, GROUP_B, GROUP_A[:2], GROUP_B[:2], template, tokens, kl_threshold=1e-4, max_layer_fraction=0.5
    )
    assert {candidate.layer for candidate in selection.candidates} == {0, 1}
    for candidate in selection.candidates:
        expected = candidate.kl <= 1e-4 and candidate.steering_score >= 0
        assert candidate.kept == expected
    kept = [candidate for candidate in selection.candidates if candidate.kept]
    if kept:
        assert selection.chosen == min(kept, key=lambda candidate: candidate.refusal_score)
    else:
        assert selection.chosen is None
        assert selection.vector is None


def test_missing_instruction_file(tmp_path):
    with pytest.raises(RecipeError, match="harmful instruction file .*harmful_train.json not found"):
        load_instructions(tmp_path / "harmful_train.json", role="harmful")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"category": None}]))
    with pytest.raises(RecipeError, match="item 0"):
        load_instructions(bad)


def test_weight_formulas_remove_direction():
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(16, 40, generator=generator)
    embedding = torch.randn(50, 16, generator=generator)
    direction = torch.randn(16, generator=generator)
    unit = direction / direction.norm()
    assert (unit @ orthogonalize_output_weight(weight, direction)).abs().max() < 1e-5
    assert (orthogonalize_embedding(embedding, direction) @ unit).abs().max() < 1e-5
    half = orthogonalize_output_weight(weight, direction, strength=0.5)
    assert torch.allclose(unit @ half, 0.5 * (unit @ weight), atol=1e-5)


def test_abliteration_equals_runtime_ablation(tmp_path, tokenizer, model_factory):
    model = model_factory(tokenizer, seed=5)
    source = tmp_path / "model"
    model.save_pretrained(source)
    tokenizer.save_pretrained(source)
    direction = torch.randn(32, generator=torch.Generator().manual_seed(9))
    result = abliterate_checkpoint(source, tmp_path / "abliterated", direction, include_embeddings=True)
    assert len(result.edited) == 2 * 4 + 1
    edited = AutoModelForCausalLM.from_pretrained(tmp_path / "abliterated", dtype=torch.float32).eval()
    ids = torch.tensor([[1, 3, 70, 80, 90, 2, 4]])
    with torch.no_grad():
        with directional_ablation(model, direction):
            expected = model(ids).logits
        actual = edited(ids).logits
        original = model(ids).logits
    assert torch.allclose(actual, expected, atol=1e-4)
    assert not torch.allclose(actual, original, atol=1e-2)
    recipe = json.loads((tmp_path / "abliterated" / "abliteration.json").read_text())
    assert recipe["edited_tensors"] == 9


def test_abliteration_layer_strength_and_tied(tmp_path, tokenizer, caplog, model_factory):
    model = model_factory(tokenizer, tie=True, seed=6)
    source = tmp_path / "model"
    model.save_pretrained(source)
    direction = torch.randn(32, generator=torch.Generator().manual_seed(2))
    with caplog.at_level(logging.WARNING):
        result = abliterate_checkpoint(source, tmp_path / "out", direction, layer_strengths={1: 0.0}, include_embeddings=True)
    assert result.tied_lm_head
    assert "ties lm_head" in caplog.text
    from safetensors.torch import load_file

    before = load_file(source / "model.safetensors")
    after = load_file(tmp_path / "out" / "model.safetensors")
    assert torch.equal(before["model.layers.1.mlp.down_proj.weight"], after["model.layers.1.mlp.down_proj.weight"])
    assert not torch.equal(before["model.layers.2.mlp.down_proj.weight"], after["model.layers.2.mlp.down_proj.weight"])
    with pytest.raises(RecipeError, match="layers \\[7\\]"):
        abliterate_checkpoint(source, tmp_path / "out2", direction, layer_strengths={7: 1.0})
