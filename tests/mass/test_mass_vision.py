"""MASS on image towers: Hugging Face CLIP and open_clip tiny random models (CLS routing, hooks)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from mergekit_ext.errors import RecipeError
from mergekit_ext.mass.build import MassBuildOptions, build_mass_artifact
from mergekit_ext.mass.runtime import MassModel
from tests.mass.mass_tiny_models import perturb_checkpoint

PIXELS = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def _only_vision(name: str) -> bool:
    return not name.startswith(("visual", "vision_model"))


def _build(base: Path, root: Path, router_layer: int) -> Path:
    models = [perturb_checkpoint(base, root / f"task{i}", seed=i + 1, skip=_only_vision) for i in range(3)]
    artifact = root / "artifact"
    build_mass_artifact(base, models, artifact, options=MassBuildOptions(device="cpu", router_layer=router_layer))
    return artifact


def _check_routing_hook(model: MassModel, block: torch.nn.Module, later_block: torch.nn.Module, batch_dim: int) -> None:
    """The router reads the CLS token entering `block`'s first MLP linear, and pass 1 stops there."""
    batch = model.adapter.prepare(PIXELS)
    recorded: dict[str, torch.Tensor] = {}
    site = model.adapter.model.get_submodule(model.router_site)
    handle = site.register_forward_pre_hook(lambda module, args: recorded.setdefault("x", args[0]))
    with torch.inference_mode():
        model.adapter(batch)
    handle.remove()
    assert site in list(block.modules())
    expected = recorded["x"][:, 0] if batch_dim == 0 else recorded["x"][0]
    calls = []
    later = later_block.register_forward_hook(lambda *args: calls.append(1))
    features, _ = model.router_features(batch)
    later.remove()
    torch.testing.assert_close(features, expected.float())
    assert calls == [], "pass 1 ran past the router block"


def test_hf_clip_vision_routes_at_block(tmp_path: Path) -> None:
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    config = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        image_size=32, patch_size=8, projection_dim=16,
    )  # fmt: skip
    base = tmp_path / "base"
    CLIPVisionModelWithProjection(config).save_pretrained(base)
    artifact = _build(base, tmp_path, router_layer=1)

    model = MassModel.from_pretrained(artifact, device="cpu")
    assert model.model_kind == "hf-clip-vision"
    assert model.adapter.token_rule == "cls"
    assert model.router_site == "vision_model.encoder.layers.1.mlp.fc1"
    layers = model.adapter.model.vision_model.encoder.layers
    _check_routing_hook(model, layers[1], layers[2], batch_dim=0)
    output = model.run(PIXELS)
    assert output.features.shape == (5, 16)
    torch.testing.assert_close(output.features.norm(dim=1), torch.ones(5))

    # With every task selected, θ_Ω is θ_MT, so reusing the prefix must give the shared model's features.
    reused = MassModel.from_pretrained(artifact, device="cpu", reuse_prefix=True, threshold=0.01)
    reused_output = reused.run(PIXELS)
    assert set(reused_output.task_sets) == {(0, 1, 2)}
    torch.testing.assert_close(reused_output.features, model.shared_features(PIXELS), atol=1e-5, rtol=1e-4)

    # Images have no special tokens to skip: the content rule is rejected, at build and at load.
    with pytest.raises(RecipeError, match="needs a text model"):
        options = MassBuildOptions(device="cpu", token_rule="content")
        build_mass_artifact(base, [base, base], tmp_path / "content", task_names=["a", "b"], options=options)
    assert not (tmp_path / "content").exists()
    with pytest.raises(RecipeError, match="needs a text model"):
        MassModel.from_pretrained(artifact, device="cpu", token_rule="content")


def _write_open_clip(folder: Path) -> Path:
    open_clip = pytest.importorskip("open_clip", reason="open_clip is not installed (pip install 'mergekit-ext[clip]')")
    torch.manual_seed(0)
    model_config = {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 3, "head_width": 8, "mlp_ratio": 2.0},
        "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1},
    }
    model = open_clip.CLIP(**model_config)
    folder.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_config}))
    return folder


def test_open_clip_routes_at_block(tmp_path: Path) -> None:
    base = _write_open_clip(tmp_path / "base")
    artifact = _build(base, tmp_path, router_layer=2)

    model = MassModel.from_pretrained(artifact, device="cpu")
    assert model.model_kind == "open-clip"
    assert model.router_site == "visual.transformer.resblocks.2.mlp.c_fc"
    assert model.adapter.hidden_batch_dim == 0
    blocks = model.adapter.model.visual.transformer.resblocks
    _check_routing_hook(model, blocks[2], model.adapter.model.visual.ln_post, batch_dim=0)
    assert model.run(PIXELS).features.shape == (5, 16)


def test_open_clip_sequence_first_layout(tmp_path: Path) -> None:
    base = _write_open_clip(tmp_path / "base")
    artifact = _build(base, tmp_path, router_layer=1)
    batch_first = MassModel.from_pretrained(artifact, device="cpu")
    sequence_first = MassModel.from_pretrained(artifact, device="cpu")
    # open_clip before 2.23 ran tokens × batch × width; switch this copy to that layout.
    transformer = sequence_first.adapter.model.visual.transformer
    transformer.batch_first = False
    for block in transformer.resblocks:
        block.attn.batch_first = False
    assert sequence_first.adapter.hidden_batch_dim == 1

    blocks = transformer.resblocks
    _check_routing_hook(sequence_first, blocks[1], blocks[2], batch_dim=1)
    expected, _ = batch_first.router_features(batch_first.adapter.prepare(PIXELS))
    features, _ = sequence_first.router_features(sequence_first.adapter.prepare(PIXELS))
    torch.testing.assert_close(features, expected, atol=1e-5, rtol=1e-5)
