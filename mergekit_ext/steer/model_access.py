"""Access to the decoder blocks of a Hugging Face causal language model.

Layer convention used throughout `mergekit_ext.steer`: layer L is the output of
decoder block L (0-based). That equals `hidden_states[L + 1]` of a transformers forward
pass with `output_hidden_states=True` for every block except the last, because
transformers applies the final norm to the last entry of `hidden_states`.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from mergekit_ext.errors import CheckpointError, InvalidTensorError, RecipeError

logger = logging.getLogger(__name__)

# Attribute paths of the decoder block list in common architectures.
_BLOCK_LIST_PATHS = ("model.layers", "model.decoder.layers", "transformer.h", "gpt_neox.layers", "layers")


def _get_attribute_path(root: nn.Module, path: str) -> object | None:
    current: object = root
    for part in path.split("."):
        if not hasattr(current, part):
            return None
        current = getattr(current, part)
    return current


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """Return the list of decoder blocks of `model`."""
    for path in _BLOCK_LIST_PATHS:
        blocks = _get_attribute_path(model, path)
        if isinstance(blocks, nn.ModuleList) and len(blocks) > 0:
            return blocks
    raise CheckpointError(
        f"cannot find the decoder blocks of {type(model).__name__}: looked for {', '.join(_BLOCK_LIST_PATHS)}; "
        "steering supports Llama, Qwen2, Mistral, Gemma, GPT-2 and GPT-NeoX style models"
    )


def hidden_size(model: nn.Module) -> int:
    """Return the width of the residual stream of `model`."""
    config = getattr(model, "config", None)
    size = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None)
    if size is None:
        raise CheckpointError(f"the config of {type(model).__name__} has no hidden_size")
    return int(size)


def check_layers(layers: list[int], num_layers: int) -> list[int]:
    """Validate 0-based block indices and return them sorted without duplicates."""
    if not layers:
        raise RecipeError("no layer given: pass at least one decoder block index, for example --layer 6")
    for layer in layers:
        if not 0 <= layer < num_layers:
            raise RecipeError(
                f"layer {layer} is out of range: the model has {num_layers} decoder blocks, "
                f"so layers run from 0 to {num_layers - 1} (layer L is the output of block L)"
            )
    return sorted(set(layers))


def check_direction_width(direction: torch.Tensor, width: int, name: str) -> None:
    """Raise when `direction` is not a vector of the residual stream width."""
    if direction.ndim != 1 or direction.shape[0] != width:
        raise InvalidTensorError(
            f"{name} has shape {tuple(direction.shape)} but the model's residual stream has width {width}; "
            "use a vector extracted from this model (or one with the same hidden_size)"
        )
    if not torch.isfinite(direction).all():
        raise InvalidTensorError(f"{name} contains NaN or Inf values")


def block_output(output: object) -> torch.Tensor:
    """Return the hidden state tensor from a decoder block's forward output."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise CheckpointError(f"unexpected decoder block output of type {type(output).__name__}")


def replace_block_output(output: object, hidden: torch.Tensor) -> object:
    """Return `output` with its hidden state tensor replaced by `hidden`."""
    if isinstance(output, torch.Tensor):
        return hidden
    assert isinstance(output, tuple)
    return (hidden, *output[1:])


def resolve_device(device: str) -> torch.device:
    """Map `auto` to CUDA when present, otherwise CPU; pass other names through."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_causal_lm(path: str | Path, device: str = "auto", dtype: torch.dtype = torch.float32) -> tuple[nn.Module, object]:
    """Load a causal language model and its tokenizer from a local folder (safetensors only)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(path)
    if not folder.is_dir():
        raise CheckpointError(f"model folder {folder} not found; pass a local Hugging Face checkpoint folder")
    if not any(folder.glob("*.safetensors")):
        raise CheckpointError(
            f"{folder} contains no .safetensors file; convert pickled weights to safetensors first "
            "(pickled checkpoints are not loaded)"
        )
    logger.info("loading model %s", folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, use_safetensors=True)
    model.to(resolve_device(device))
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return model, tokenizer
