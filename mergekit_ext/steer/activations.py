"""Recording block outputs of a causal language model at chosen token positions."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from mergekit_ext.errors import RecipeError
from mergekit_ext.steer.model_access import block_output, decoder_blocks


def parse_position(rule: str) -> list[int] | None:
    """Parse a position rule into offsets from the end of the prompt, or None for `mean`.

    `last` is offset -1; `index:-3` is the third token from the end; `index:-3,-1` reads
    two positions; `mean` averages over all prompt tokens.
    """
    if rule == "last":
        return [-1]
    if rule == "mean":
        return None
    if rule.startswith("index:"):
        try:
            offsets = [int(part) for part in rule[len("index:") :].split(",")]
        except ValueError as error:
            raise RecipeError(f"invalid position rule {rule!r}: use index:-1 or index:-3,-1") from error
        if any(offset >= 0 for offset in offsets):
            raise RecipeError(f"invalid position rule {rule!r}: offsets count from the end and must be negative")
        return offsets
    raise RecipeError(f"unknown position rule {rule!r}; use last, mean or index:-k")


@torch.no_grad()
def collect_block_outputs(
    model: nn.Module,
    sequences: list[list[int]],
    layers: list[int],
    position: str = "last",
    batch_size: int = 8,
    progress: Callable[[int], None] | None = None,
) -> dict[int, torch.Tensor]:
    """Return block outputs in float32 as {layer: tensor(len(sequences), positions, hidden)}.

    Batches are right-padded and masked, so padding never reaches a real token (the
    attention is causal and pads come after the real tokens).
    """
    offsets = parse_position(position)
    shortest = min(len(sequence) for sequence in sequences)
    if offsets is not None and -min(offsets) > shortest:
        raise RecipeError(f"position rule {position!r} reaches before the start of a {shortest}-token prompt")
    blocks = decoder_blocks(model)
    device = next(model.parameters()).device
    captured: dict[int, torch.Tensor] = {}
    handles = []
    for layer in layers:
        def hook(module: nn.Module, args: object, output: object, layer: int = layer) -> None:
            captured[layer] = block_output(output)

        handles.append(blocks[layer].register_forward_hook(hook))

    results: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    try:
        for start in range(0, len(sequences), batch_size):
            batch = sequences[start : start + batch_size]
            lengths = torch.tensor([len(sequence) for sequence in batch], device=device)
            width = int(lengths.max())
            input_ids = torch.zeros((len(batch), width), dtype=torch.long, device=device)
            attention_mask = torch.zeros_like(input_ids)
            for row, sequence in enumerate(batch):
                input_ids[row, : len(sequence)] = torch.tensor(sequence, device=device)
                attention_mask[row, : len(sequence)] = 1
            model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
            for layer in layers:
                hidden = captured[layer].float()
                if offsets is None:
                    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
                    reduced = ((hidden * mask).sum(dim=1) / lengths.unsqueeze(-1)).unsqueeze(1)
                else:
                    index = lengths.unsqueeze(1) + torch.tensor(offsets, device=device).unsqueeze(0)
                    reduced = hidden[torch.arange(len(batch), device=device).unsqueeze(1), index]
                results[layer].append(reduced.cpu())
            if progress is not None:
                progress(len(batch))
    finally:
        for handle in handles:
            handle.remove()
    return {layer: torch.cat(chunks) for layer, chunks in results.items()}
