"""MASS router on GPT-2, whose MLP input linear is a transposed Conv1D."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from mergekit_ext.mass.build import MassBuildOptions, build_mass_artifact
from mergekit_ext.mass.router import residual_norms
from mergekit_ext.mass.runtime import MassModel
from tests.mass.mass_tiny_models import perturb_checkpoint, word_level_tokenizer

HIDDEN = 32


def write_tiny_gpt2(folder: Path, seed: int = 0) -> Path:
    """Write a random 2-block GPT-2 (hidden 32) with a word-level tokenizer to `folder`."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    wrapped = word_level_tokenizer()
    vocabulary = wrapped.get_vocab()
    config = GPT2Config(
        vocab_size=len(vocabulary), n_embd=HIDDEN, n_layer=2, n_head=4, n_positions=64,
        eos_token_id=1, pad_token_id=0, bos_token_id=1, tie_word_embeddings=False,
    )  # fmt: skip
    folder.mkdir(parents=True, exist_ok=True)
    GPT2LMHeadModel(config).eval().save_pretrained(folder)
    wrapped.save_pretrained(folder)
    return folder


def test_conv1d_router_uses_input_side(tmp_path: Path) -> None:
    base = write_tiny_gpt2(tmp_path / "base")
    tasks = [perturb_checkpoint(base, tmp_path / f"task{i}", seed=i + 1, scale=2.0) for i in range(2)]
    artifact = tmp_path / "artifact"
    build_mass_artifact(base, tasks, artifact, options=MassBuildOptions(device="cpu", mode="top1"))
    model = MassModel.from_pretrained(artifact, device="cpu")

    assert model.router_site.endswith("mlp.c_fc")
    # Conv1D stores (in, out) = (32, 128): the router must work in the 32-wide input space.
    for basis in model.bases:
        assert basis.shape[1] == HIDDEN

    base_weights = load_file(str(base / "model.safetensors"))
    weight_name = next(name for name in base_weights if name.endswith(f"h.{model.router_layer}.mlp.c_fc.weight"))
    for index, task in enumerate(tasks):
        delta = load_file(str(task / "model.safetensors"))[weight_name].float() - base_weights[weight_name].float()
        assert delta.shape[0] == HIDDEN
        # The unit input-side directions of the rank-2 change lie in the task's basis (up to
        # float32 rounding of the stored factors) and far outside the other task's basis.
        inputs = torch.linalg.svd(delta, full_matrices=False).U[:, :2].T
        residuals = residual_norms(inputs, model.bases)
        assert torch.all(residuals[:, index] < 1e-2)
        assert torch.all(residuals[:, 1 - index] > 0.3)
