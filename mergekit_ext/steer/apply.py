"""Adding a steering vector to block outputs at run time."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from mergekit_ext.errors import RecipeError
from mergekit_ext.steer.model_access import (
    block_output,
    check_direction_width,
    check_layers,
    decoder_blocks,
    hidden_size,
    replace_block_output,
)
from mergekit_ext.steer.template import PromptTemplate
from mergekit_ext.steer.vector import SteeringVector

PROTOCOLS = ("prefill", "all-steps")


class _ForwardState:
    """Per-forward facts the block hooks need: prefill or not, and the attention mask."""

    def __init__(self) -> None:
        self.is_prefill = True
        self.attention_mask: torch.Tensor | None = None

    def update(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        seen = cache.get_seq_length() if cache is not None and hasattr(cache, "get_seq_length") else 0
        self.is_prefill = seen == 0
        mask = kwargs.get("attention_mask")
        self.attention_mask = mask if isinstance(mask, torch.Tensor) and mask.ndim == 2 else None


@contextmanager
def steering(
    model: nn.Module,
    vector: SteeringVector,
    alpha: float = 1.0,
    protocol: str = "all-steps",
    layers: list[int] | None = None,
) -> Iterator[None]:
    """Add alpha * v to the output of each steered block while the context is open.

    `prefill` steers only forward passes without cached tokens (the prompt);
    `all-steps` steers every forward pass, including each generated token.
    Padding positions (attention mask 0) are left unchanged. Hooks are removed on exit,
    also when the body raises.
    """
    if protocol not in PROTOCOLS:
        raise RecipeError(f"unknown steering protocol {protocol!r}; use prefill or all-steps")
    blocks = decoder_blocks(model)
    steered = check_layers(layers if layers is not None else vector.layers, len(blocks))
    missing = [layer for layer in steered if layer not in vector.directions]
    if missing:
        raise RecipeError(f"the vector has no direction for layers {missing}; it has {vector.layers}")
    width = hidden_size(model)
    parameter = next(model.parameters())
    additions = {}
    for layer in steered:
        check_direction_width(vector.directions[layer], width, f"direction.{layer}")
        additions[layer] = (alpha * vector.directions[layer].float()).to(device=parameter.device, dtype=parameter.dtype)

    state = _ForwardState()
    handles = [model.register_forward_pre_hook(state.update, with_kwargs=True)]

    def make_hook(addition: torch.Tensor):  # noqa: ANN202
        def hook(module: nn.Module, args: object, output: object) -> object:
            if protocol == "prefill" and not state.is_prefill:
                return output
            hidden = block_output(output)
            delta = addition.expand_as(hidden)
            mask = state.attention_mask
            if mask is not None and mask.shape[0] == hidden.shape[0] and mask.shape[1] >= hidden.shape[1]:
                delta = delta * mask[:, -hidden.shape[1] :].unsqueeze(-1).to(hidden.dtype)
            return replace_block_output(output, hidden + delta)

        return hook

    try:
        for layer, addition in additions.items():
            handles.append(blocks[layer].register_forward_hook(make_hook(addition)))
        yield
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def generate(
    model: nn.Module,
    tokenizer: object,
    prompts: list[str],
    template: PromptTemplate,
    vector: SteeringVector | None = None,
    alpha: float = 1.0,
    protocol: str = "all-steps",
    max_new_tokens: int = 32,
    batch_size: int = 8,
) -> list[str]:
    """Generate greedy completions of `prompts`, steered when `vector` is given.

    Batches are left-padded with position ids taken from the attention mask, so a
    padded prompt continues exactly as it would alone (up to float rounding).
    """
    device = next(model.parameters()).device
    eos_id = getattr(tokenizer, "eos_token_id", None)
    pad_id = getattr(tokenizer, "pad_token_id", None)
    if pad_id is None:
        pad_id = eos_id if eos_id is not None else 0
    outputs: list[str] = []
    for start in range(0, len(prompts), batch_size):
        sequences = [template.token_ids(tokenizer, prompt) for prompt in prompts[start : start + batch_size]]
        width = max(len(sequence) for sequence in sequences)
        input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long, device=device)
        attention_mask = torch.zeros_like(input_ids)
        for row, sequence in enumerate(sequences):
            input_ids[row, width - len(sequence) :] = torch.tensor(sequence, device=device)
            attention_mask[row, width - len(sequence) :] = 1
        arguments = dict(
            input_ids=input_ids,
            attention_mask=attention_mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad_id,
            eos_token_id=eos_id,
        )
        if vector is None:
            generated = model.generate(**arguments)
        else:
            with steering(model, vector, alpha, protocol):
                generated = model.generate(**arguments)
        for row in generated[:, width:]:
            outputs.append(tokenizer.decode(row, skip_special_tokens=True).strip())  # type: ignore[attr-defined]
    return outputs
