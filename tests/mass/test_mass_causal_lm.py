"""MASS on a causal LM: routing on the mean of prompt tokens, generation with θ_Ω."""

from __future__ import annotations

from pathlib import Path

import torch

from mergekit_ext.mass.build import MassBuildOptions, build_mass_artifact
from mergekit_ext.mass.runtime import MassModel
from tests.mass.mass_tiny_models import perturb_checkpoint, write_tiny_llama


def test_causal_lm_generates_with_merged_weights(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    base = write_tiny_llama(tmp_path / "base")
    models = [perturb_checkpoint(base, tmp_path / f"task{i}", seed=i + 1, scale=2.0) for i in range(2)]
    artifact = tmp_path / "artifact"
    build_mass_artifact(base, models, artifact, options=MassBuildOptions(device="cpu", mode="top1"))

    model = MassModel.from_pretrained(artifact, device="cpu")
    assert model.model_kind == "causal-lm"
    assert model.adapter.token_rule == "mean"
    assert model.router_site == "model.layers.1.mlp.gate_proj"
    prompts = ["alpha beta gamma", "river"]
    texts = model.generate(prompts, max_new_tokens=4, do_sample=False)
    assert len(texts) == 2

    # Reference: materialize θ_Ω of each prompt's task set and generate with plain transformers.
    decision, _ = model.route(model.adapter.prepare(prompts))
    for prompt, task_set, text in zip(prompts, decision.task_sets, texts):
        reference = AutoModelForCausalLM.from_pretrained(base).eval()
        merged = {name.removeprefix("model."): tensor for name, tensor in model.merged_parameters(task_set).items()}
        reference.load_state_dict(merged, strict=False)
        encoded = model.adapter.tokenizer([prompt], return_tensors="pt")
        with torch.inference_mode():
            sequence = reference.generate(**encoded, max_new_tokens=4, do_sample=False)
        expected = model.adapter.tokenizer.decode(sequence[0, encoded["input_ids"].shape[1] :], skip_special_tokens=True)
        assert text == expected
