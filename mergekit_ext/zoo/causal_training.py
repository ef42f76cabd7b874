"""Training loop shared by the zoos that train tiny causal LMs from scratch (chat, reasoning)."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable

import torch

logger = logging.getLogger(__name__)

# (token ids of prompt + completion, prompt length): the loss covers the completion only.
EncodedExample = tuple[list[int], int]
StepProgress = Callable[[str, int, int], None]


def collate_completions(batch: list[EncodedExample], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-pad a batch; return input ids, labels (-100 on prompt and padding) and the attention mask."""
    length = max(len(ids) for ids, _ in batch)
    input_ids = torch.full((len(batch), length), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), length), -100, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), length), dtype=torch.long)
    for row, (ids, prompt_length) in enumerate(batch):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention_mask[row, : len(ids)] = 1
        labels[row, prompt_length : len(ids)] = torch.tensor(ids[prompt_length:])
    return input_ids, labels, attention_mask


def train_completions(
    model: torch.nn.Module,
    next_batch: Callable[[int], list[EncodedExample]],
    *,
    steps: int,
    learning_rate: float,
    weight_decay: float,
    pad_id: int,
    stage: str,
    progress: StepProgress | None = None,
) -> float:
    """Train with AdamW and a warmup-then-cosine schedule on the batches `next_batch(step)` returns.

    Gradients are clipped to norm 1. Returns the last step's loss.
    """
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=weight_decay, betas=(0.9, 0.98))
    warmup = max(1, steps // 20)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(step, steps) / steps)),
    )
    started = time.perf_counter()
    loss_value = float("nan")
    for step in range(steps):
        input_ids, labels, attention_mask = collate_completions(next_batch(step), pad_id)
        loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        loss_value = float(loss.detach())
        if progress is not None:
            progress(stage, step + 1, steps)
    logger.info("Trained %s: %d steps in %.1f s, last loss %.4f", stage, steps, time.perf_counter() - started, loss_value)
    model.eval()
    return loss_value
