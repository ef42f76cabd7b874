"""Directional ablation: at run time with hooks, or folded into the weights.

Run-time ablation removes the component along r̂ from everything written into the
residual stream: the token embedding, every attention output and every MLP output.
Weight orthogonalization gives the same result by editing the matrices that write
into the residual stream:

    W_out <- W_out - s r̂ r̂ᵀ W_out     (o_proj, down_proj; shape (hidden, in))
    b_out <- b_out - s (r̂ᵀ b_out) r̂
    E     <- E - s (E r̂) r̂ᵀ           (token embedding; shape (vocab, hidden))

with s = 1 for full ablation (Arditi et al. 2024, "Refusal in Language Models Is
Mediated by a Single Direction").
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from mergekit_ext.errors import CheckpointError
from mergekit_ext.steer.model_access import check_direction_width, decoder_blocks, hidden_size


def unit(direction: torch.Tensor) -> torch.Tensor:
    """Return direction / ||direction|| in float32."""
    norm = direction.double().norm()
    if norm == 0:
        raise CheckpointError("the ablation direction has zero norm")
    return (direction.double() / norm).float()


def orthogonalize_output_weight(weight: torch.Tensor, direction: torch.Tensor, strength: float = 1.0) -> torch.Tensor:
    """Return W - s r̂ r̂ᵀ W for a weight whose rows index the residual stream (float32 math)."""
    r = unit(direction).to(weight.device)
    w = weight.float()
    return (w - strength * torch.outer(r, r @ w)).to(weight.dtype)


def orthogonalize_output_bias(bias: torch.Tensor, direction: torch.Tensor, strength: float = 1.0) -> torch.Tensor:
    """Return b - s (r̂ᵀ b) r̂."""
    r = unit(direction).to(bias.device)
    b = bias.float()
    return (b - strength * (r @ b) * r).to(bias.dtype)


def orthogonalize_embedding(weight: torch.Tensor, direction: torch.Tensor, strength: float = 1.0) -> torch.Tensor:
    """Return E - s (E r̂) r̂ᵀ for an embedding matrix of shape (vocab, hidden)."""
    r = unit(direction).to(weight.device)
    e = weight.float()
    return (e - strength * torch.outer(e @ r, r)).to(weight.dtype)


def _ablate(tensor: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    return tensor - (tensor @ r).unsqueeze(-1) * r


def _sublayers(block: nn.Module) -> tuple[nn.Module, nn.Module]:
    attention = getattr(block, "self_attn", None)
    mlp = getattr(block, "mlp", None)
    if attention is None or mlp is None:
        raise CheckpointError(f"{type(block).__name__} has no self_attn and mlp modules; directional ablation needs them")
    if hasattr(block, "post_feedforward_layernorm"):
        # Gemma-2 style blocks normalize each sublayer output before the residual add, so
        # ablating the sublayer output differs from ablating the residual stream.
        raise CheckpointError(f"{type(block).__name__} normalizes sublayer outputs; directional ablation is unsupported")
    return attention, mlp


@contextmanager
def directional_ablation(model: nn.Module, direction: torch.Tensor) -> Iterator[None]:
    """Remove the component along `direction` from the embedding, attention and MLP outputs."""
    check_direction_width(direction, hidden_size(model), "ablation direction")
    parameter = next(model.parameters())
    r = unit(direction).to(device=parameter.device, dtype=parameter.dtype)

    def output_hook(module: nn.Module, args: object, output: object) -> object:
        if isinstance(output, tuple):
            return (_ablate(output[0], r), *output[1:])
        return _ablate(output, r)

    modules: list[nn.Module] = [model.get_input_embeddings()]
    for block in decoder_blocks(model):
        modules.extend(_sublayers(block))
    handles = [module.register_forward_hook(output_hook) for module in modules]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
