"""Tiny seeded checkpoints with real architectures' tensor names, for tests and examples.

The layouts follow Llama (`model.layers.N.self_attn.q_proj.weight`, ...), GPT-2
(`h.N.attn.c_attn.weight`, ...) and BERT (`encoder.layer.N.attention.self.query.weight`,
...), with small shapes, so that merges, recipes and CLI commands can run in
milliseconds without downloading anything.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

ARCHITECTURES = ("llama", "gpt2", "bert")


def tiny_state_dict(
    architecture: str = "llama",
    *,
    seed: int = 0,
    num_layers: int = 2,
    hidden: int = 16,
    vocab_size: int = 32,
    dtype: torch.dtype = torch.float32,
    scale: float = 0.02,
) -> dict[str, torch.Tensor]:
    """Return a random state dict with the tensor names and shapes of `architecture`."""
    if architecture not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {architecture!r}; choose one of {ARCHITECTURES}")
    generator = torch.Generator().manual_seed(seed)
    shapes = _shapes(architecture, num_layers, hidden, vocab_size)
    state = {}
    for name, shape in shapes.items():
        if name.endswith("position_ids"):
            state[name] = torch.arange(shape[-1], dtype=torch.int64).reshape(shape)
            continue
        values = torch.randn(shape, generator=generator) * scale
        if "norm" in name.lower() and name.endswith("weight"):
            values = values + 1.0
        state[name] = values.to(dtype)
    return state


def _shapes(architecture: str, num_layers: int, hidden: int, vocab_size: int) -> dict[str, tuple[int, ...]]:
    intermediate = hidden * 2
    shapes: dict[str, tuple[int, ...]] = {}
    if architecture == "llama":
        shapes["model.embed_tokens.weight"] = (vocab_size, hidden)
        for layer in range(num_layers):
            prefix = f"model.layers.{layer}"
            for projection in ("q_proj", "k_proj", "v_proj", "o_proj"):
                shapes[f"{prefix}.self_attn.{projection}.weight"] = (hidden, hidden)
            shapes[f"{prefix}.mlp.gate_proj.weight"] = (intermediate, hidden)
            shapes[f"{prefix}.mlp.up_proj.weight"] = (intermediate, hidden)
            shapes[f"{prefix}.mlp.down_proj.weight"] = (hidden, intermediate)
            shapes[f"{prefix}.input_layernorm.weight"] = (hidden,)
            shapes[f"{prefix}.post_attention_layernorm.weight"] = (hidden,)
        shapes["model.norm.weight"] = (hidden,)
        shapes["lm_head.weight"] = (vocab_size, hidden)
    elif architecture == "gpt2":
        shapes["wte.weight"] = (vocab_size, hidden)
        shapes["wpe.weight"] = (16, hidden)
        for layer in range(num_layers):
            prefix = f"h.{layer}"
            shapes[f"{prefix}.ln_1.weight"] = (hidden,)
            shapes[f"{prefix}.ln_1.bias"] = (hidden,)
            shapes[f"{prefix}.attn.c_attn.weight"] = (hidden, 3 * hidden)
            shapes[f"{prefix}.attn.c_attn.bias"] = (3 * hidden,)
            shapes[f"{prefix}.attn.c_proj.weight"] = (hidden, hidden)
            shapes[f"{prefix}.attn.c_proj.bias"] = (hidden,)
            shapes[f"{prefix}.ln_2.weight"] = (hidden,)
            shapes[f"{prefix}.ln_2.bias"] = (hidden,)
            shapes[f"{prefix}.mlp.c_fc.weight"] = (hidden, 4 * hidden)
            shapes[f"{prefix}.mlp.c_fc.bias"] = (4 * hidden,)
            shapes[f"{prefix}.mlp.c_proj.weight"] = (4 * hidden, hidden)
            shapes[f"{prefix}.mlp.c_proj.bias"] = (hidden,)
        shapes["ln_f.weight"] = (hidden,)
        shapes["ln_f.bias"] = (hidden,)
    else:
        shapes["embeddings.word_embeddings.weight"] = (vocab_size, hidden)
        shapes["embeddings.position_embeddings.weight"] = (16, hidden)
        shapes["embeddings.position_ids"] = (1, 16)
        shapes["embeddings.LayerNorm.weight"] = (hidden,)
        shapes["embeddings.LayerNorm.bias"] = (hidden,)
        for layer in range(num_layers):
            prefix = f"encoder.layer.{layer}"
            for projection in ("query", "key", "value"):
                shapes[f"{prefix}.attention.self.{projection}.weight"] = (hidden, hidden)
                shapes[f"{prefix}.attention.self.{projection}.bias"] = (hidden,)
            shapes[f"{prefix}.attention.output.dense.weight"] = (hidden, hidden)
            shapes[f"{prefix}.attention.output.dense.bias"] = (hidden,)
            shapes[f"{prefix}.attention.output.LayerNorm.weight"] = (hidden,)
            shapes[f"{prefix}.attention.output.LayerNorm.bias"] = (hidden,)
            shapes[f"{prefix}.intermediate.dense.weight"] = (intermediate, hidden)
            shapes[f"{prefix}.intermediate.dense.bias"] = (intermediate,)
            shapes[f"{prefix}.output.dense.weight"] = (hidden, intermediate)
            shapes[f"{prefix}.output.dense.bias"] = (hidden,)
            shapes[f"{prefix}.output.LayerNorm.weight"] = (hidden,)
            shapes[f"{prefix}.output.LayerNorm.bias"] = (hidden,)
    return shapes


def write_tiny_checkpoint(
    folder: str | Path,
    architecture: str = "llama",
    *,
    seed: int = 0,
    num_layers: int = 2,
    hidden: int = 16,
    vocab_size: int = 32,
    dtype: torch.dtype = torch.float32,
    state: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write a tiny checkpoint folder (`model.safetensors`, `config.json`, a tokenizer config)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if state is None:
        state = tiny_state_dict(
            architecture, seed=seed, num_layers=num_layers, hidden=hidden, vocab_size=vocab_size, dtype=dtype
        )
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = _config(architecture, num_layers, hidden, vocab_size)
    config["torch_dtype"] = str(dtype).removeprefix("torch.")
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 16}) + "\n")
    return folder


def _config(architecture: str, num_layers: int, hidden: int, vocab_size: int) -> dict[str, object]:
    # Complete enough for transformers' AutoConfig and mergekit's architecture detection.
    if architecture == "llama":
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": hidden,
            "intermediate_size": hidden * 2,
            "num_hidden_layers": num_layers,
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
            "vocab_size": vocab_size,
            "max_position_embeddings": 64,
            "rms_norm_eps": 1e-6,
            "tie_word_embeddings": False,
        }
    if architecture == "gpt2":
        return {
            "architectures": ["GPT2Model"],
            "model_type": "gpt2",
            "n_embd": hidden,
            "n_layer": num_layers,
            "n_head": 2,
            "n_positions": 16,
            "vocab_size": vocab_size,
        }
    return {
        "architectures": ["BertModel"],
        "model_type": "bert",
        "hidden_size": hidden,
        "intermediate_size": hidden * 2,
        "num_hidden_layers": num_layers,
        "num_attention_heads": 2,
        "max_position_embeddings": 16,
        "type_vocab_size": 0,
        "vocab_size": vocab_size,
    }
