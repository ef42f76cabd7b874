"""Greedy generation with left padding and exact generated-length accounting.

Length is the number of generated tokens up to and including the first stop
token, which is how vLLM counts `len(output.token_ids)` for a finished
sequence. Tokens after the first stop token (padding, which may equal the eos
token) never count. An output without a stop token within `max_new_tokens`
counts `max_new_tokens` and is flagged as truncated.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from pydantic import BaseModel, ConfigDict, Field

logger = logging.getLogger(__name__)

# Prompt of the Evo-L2S evaluation (no chat template).
DEFAULT_PROMPT_TEMPLATE = (
    "User: {question}\nPlease reason step by step, and put your final answer within \\boxed{{}}.\n\nAssistant:"
)


class GenerationSettings(BaseModel):
    """Decoding options; defaults follow the Evo-L2S evaluation."""

    model_config = ConfigDict(extra="forbid")

    prompt_template: str = DEFAULT_PROMPT_TEMPLATE
    max_new_tokens: int = Field(10240, ge=1)
    # Extra stop tokens (strings of single tokens); the tokenizer's eos token always stops.
    stop_tokens: list[str] = Field(default_factory=list)
    use_chat_template: bool = False
    # Rows per generate call; halves on CUDA out-of-memory errors.
    batch_size: int = Field(64, ge=1)


@dataclass(frozen=True)
class Generation:
    """One generated completion with its length accounting."""

    text: str
    num_tokens: int
    truncated: bool
    token_ids: tuple[int, ...] = field(repr=False, default=())


def format_prompt(tokenizer, question: str, settings: GenerationSettings) -> str:
    if settings.use_chat_template:
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
        )
    return settings.prompt_template.format(question=question)


def stop_token_ids(tokenizer, settings: GenerationSettings) -> list[int]:
    """Return the eos token id plus the ids of `settings.stop_tokens`."""
    ids: list[int] = []
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    for token in settings.stop_tokens:
        token_id = tokenizer.convert_tokens_to_ids(token)
        if token_id is None or token_id == tokenizer.unk_token_id:
            from mergekit_ext.errors import RecipeError

            raise RecipeError(f"Stop token {token!r} is not a single token of the tokenizer; remove it.")
        ids.append(int(token_id))
    return ids


def count_generated(generated: torch.Tensor, stop_ids: list[int], max_new_tokens: int) -> list[tuple[int, bool]]:
    """Return (length, truncated) per row of generated ids (prompt excluded).

    Length counts tokens up to and including the first stop token; a row
    without a stop token has length `max_new_tokens` and is truncated. A row
    shorter than `max_new_tokens` without a stop token cannot come from
    `generate` and counts its full width.
    """
    stops = torch.isin(generated, torch.tensor(stop_ids, device=generated.device))
    results = []
    for row in range(generated.shape[0]):
        positions = torch.nonzero(stops[row]).flatten()
        if positions.numel() > 0:
            results.append((int(positions[0]) + 1, False))
        else:
            results.append((int(generated.shape[1]), generated.shape[1] >= max_new_tokens))
    return results


def encode_prompts(tokenizer, prompts: list[str], device: torch.device) -> dict[str, torch.Tensor]:
    """Tokenize with left padding, so every row's last prompt token is at the same position."""
    previous = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        encoded = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    finally:
        tokenizer.padding_side = previous
    return {name: tensor.to(device) for name, tensor in encoded.items() if name in ("input_ids", "attention_mask")}


@torch.inference_mode()
def generate_greedy(
    model: torch.nn.Module,
    tokenizer,
    prompts: list[str],
    settings: GenerationSettings,
    before_batch=None,
) -> list[Generation]:
    """Greedy-decode every prompt in batches; `before_batch(start, stop)` runs before each batch.

    On a CUDA out-of-memory error the batch size halves and the batch reruns.
    """
    device = next(model.parameters()).device
    stop_ids = stop_token_ids(tokenizer, settings)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
    batch_size = settings.batch_size
    results: list[Generation] = []
    start = 0
    while start < len(prompts):
        stop = min(start + batch_size, len(prompts))
        try:
            if before_batch is not None:
                before_batch(start, stop)
            results.extend(_generate_batch(model, tokenizer, prompts[start:stop], settings, stop_ids, pad_id, device))
        except torch.cuda.OutOfMemoryError:
            if batch_size == 1:
                raise
            batch_size = max(1, batch_size // 2)
            torch.cuda.empty_cache()
            logger.warning("CUDA out of memory; batch size reduced to %d", batch_size)
            continue
        start = stop
    return results


def _generate_batch(model, tokenizer, prompts, settings, stop_ids, pad_id, device) -> list[Generation]:
    inputs = encode_prompts(tokenizer, prompts, device)
    output = model.generate(
        **inputs,
        do_sample=False,
        max_new_tokens=settings.max_new_tokens,
        eos_token_id=stop_ids,
        pad_token_id=pad_id,
    )
    generated = output[:, inputs["input_ids"].shape[1] :]
    generations = []
    for row, (length, truncated) in enumerate(count_generated(generated, stop_ids, settings.max_new_tokens)):
        ids = generated[row, :length].tolist()
        text_ids = ids[:-1] if not truncated and ids and ids[-1] in stop_ids else ids
        generations.append(
            Generation(
                text=tokenizer.decode(text_ids, skip_special_tokens=True),
                num_tokens=length,
                truncated=truncated,
                token_ids=tuple(ids),
            )
        )
    return generations
