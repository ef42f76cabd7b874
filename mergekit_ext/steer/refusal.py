"""The refusal direction: mean difference of harmful and harmless prompts.

Fast mode takes mean(harmful) - mean(harmless) at given layers and one position rule.
The full selection follows Arditi et al. 2024 ("Refusal in Language Models Is Mediated
by a Single Direction"): one candidate per post-instruction position (the template
suffix tokens) and layer; drop candidates from layers >= 0.8 * num_layers, candidates
whose ablation moves the harmless next-token distribution by KL > 0.1, and candidates
whose addition does not induce refusal on harmless prompts; keep the one with the
lowest refusal score on harmful prompts under directional ablation.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from mergekit_ext.errors import RecipeError
from mergekit_ext.steer.ablation import directional_ablation
from mergekit_ext.steer.activations import collect_block_outputs
from mergekit_ext.steer.apply import steering
from mergekit_ext.steer.data import hash_pairs, ContrastivePair
from mergekit_ext.steer.extract import encode_texts
from mergekit_ext.steer.model_access import check_layers, decoder_blocks
from mergekit_ext.steer.template import PromptTemplate
from mergekit_ext.steer.vector import SteeringRecipe, SteeringVector

logger = logging.getLogger(__name__)

DEFAULT_REFUSAL_PHRASES = ("I", "As", "Sorry")


def refusal_token_ids(tokenizer: object, phrases: tuple[str, ...] = DEFAULT_REFUSAL_PHRASES) -> list[int]:
    """Return the first token id of each refusal phrase (deduplicated)."""
    ids: list[int] = []
    for phrase in phrases:
        encoded = tokenizer(phrase, add_special_tokens=False)["input_ids"]  # type: ignore[operator]
        if encoded and encoded[0] not in ids:
            ids.append(int(encoded[0]))
    if not ids:
        raise RecipeError(f"none of the refusal phrases {phrases} tokenizes to a token")
    return ids


def _instruction_pairs_hash(harmful: list[str], harmless: list[str]) -> str:
    # Lists differ in length, so hash them as two one-sided "pairs" lists.
    return hash_pairs([ContrastivePair(positive="\n".join(harmful), negative="\n".join(harmless))])


def refusal_direction_fast(
    model: nn.Module,
    tokenizer: object,
    harmful: list[str],
    harmless: list[str],
    layers: list[int],
    template: PromptTemplate,
    position: str = "last",
    batch_size: int = 8,
    model_name: str = "",
    progress: Callable[[int], None] | None = None,
) -> SteeringVector:
    """Return r = mean block output on harmful prompts - mean on harmless prompts, per layer."""
    if not harmful or not harmless:
        raise RecipeError("the refusal direction needs at least one harmful and one harmless instruction")
    layers = check_layers(layers, len(decoder_blocks(model)))
    started = time.perf_counter()
    harmful_states = collect_block_outputs(model, encode_texts(tokenizer, template, harmful), layers, position, batch_size, progress)
    harmless_states = collect_block_outputs(model, encode_texts(tokenizer, template, harmless), layers, position, batch_size, progress)
    directions = {
        layer: (harmful_states[layer].mean(dim=1).double().mean(dim=0) - harmless_states[layer].mean(dim=1).double().mean(dim=0)).float()
        for layer in layers
    }
    logger.info("refusal direction at layers %s from %d + %d prompts in %.1f s", layers, len(harmful), len(harmless), time.perf_counter() - started)
    recipe = SteeringRecipe(
        model=model_name,
        position=position,
        method="refusal_mean_difference",
        template_prefix=template.prefix,
        template_suffix=template.suffix,
        template_hash=template.digest(tokenizer),
        dataset_hash=_instruction_pairs_hash(harmful, harmless),
        num_pairs=min(len(harmful), len(harmless)),
        extra={"num_harmful": str(len(harmful)), "num_harmless": str(len(harmless))},
    )
    return SteeringVector(directions=directions, recipe=recipe)


@torch.no_grad()
def last_token_log_probs(model: nn.Module, sequences: list[list[int]], batch_size: int = 8) -> torch.Tensor:
    """Return float64 log-probabilities of the next token after each sequence, shape (n, vocab)."""
    device = next(model.parameters()).device
    rows = []
    for start in range(0, len(sequences), batch_size):
        batch = sequences[start : start + batch_size]
        width = max(len(sequence) for sequence in batch)
        input_ids = torch.zeros((len(batch), width), dtype=torch.long, device=device)
        attention_mask = torch.zeros_like(input_ids)
        for row, sequence in enumerate(batch):
            input_ids[row, : len(sequence)] = torch.tensor(sequence, device=device)
            attention_mask[row, : len(sequence)] = 1
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        last = attention_mask.sum(dim=1) - 1
        rows.append(torch.log_softmax(logits[torch.arange(len(batch), device=device), last].double(), dim=-1).cpu())
    return torch.cat(rows)


def refusal_score(log_probs: torch.Tensor, token_ids: list[int]) -> torch.Tensor:
    """Per-prompt log-odds of starting a refusal: log p - log(1 - p), p = sum of refusal-token probabilities."""
    log_p = torch.logsumexp(log_probs[:, token_ids], dim=-1)
    return log_p - torch.log1p(-torch.exp(log_p).clamp(max=1 - 1e-12))


def mean_kl(reference: torch.Tensor, other: torch.Tensor) -> float:
    """Mean KL(reference || other) over prompts, both given as log-probabilities."""
    return float((reference.exp() * (reference - other)).sum(dim=-1).mean())


@dataclass
class RefusalCandidate:
    """One candidate direction of the full selection and its scores."""

    layer: int
    position: int
    refusal_score: float = float("nan")
    steering_score: float = float("nan")
    kl: float = float("nan")
    kept: bool = False
    reason: str = ""


@dataclass
class RefusalSelection:
    """Result of the full selection: every candidate, the chosen one and its direction."""

    candidates: list[RefusalCandidate]
    baseline_refusal_score: float
    baseline_harmless_score: float
    chosen: RefusalCandidate | None = None
    vector: SteeringVector | None = None
    settings: dict[str, float] = field(default_factory=dict)


def select_refusal_direction(
    model: nn.Module,
    tokenizer: object,
    harmful_train: list[str],
    harmless_train: list[str],
    harmful_val: list[str],
    harmless_val: list[str],
    template: PromptTemplate,
    refusal_tokens: list[int],
    kl_threshold: float = 0.1,
    max_layer_fraction: float = 0.8,
    require_inducing: bool = True,
    batch_size: int = 8,
    model_name: str = "",
    progress: Callable[[int], None] | None = None,
) -> RefusalSelection:
    """Run the full selection; `progress` is called once per evaluated candidate."""
    num_layers = len(decoder_blocks(model))
    suffix_length = len(template.suffix_ids(tokenizer))
    offsets = list(range(-max(suffix_length, 1), 0))
    layers = [layer for layer in range(num_layers) if layer < max_layer_fraction * num_layers]
    if not layers:
        raise RecipeError(f"max_layer_fraction {max_layer_fraction} leaves no layer of {num_layers}")
    position_rule = "index:" + ",".join(str(offset) for offset in offsets)
    harmful_states = collect_block_outputs(model, encode_texts(tokenizer, template, harmful_train), layers, position_rule, batch_size)
    harmless_states = collect_block_outputs(model, encode_texts(tokenizer, template, harmless_train), layers, position_rule, batch_size)

    harmful_val_ids = encode_texts(tokenizer, template, harmful_val)
    harmless_val_ids = encode_texts(tokenizer, template, harmless_val)
    baseline_harmful = last_token_log_probs(model, harmful_val_ids, batch_size)
    baseline_harmless = last_token_log_probs(model, harmless_val_ids, batch_size)
    selection = RefusalSelection(
        candidates=[],
        baseline_refusal_score=float(refusal_score(baseline_harmful, refusal_tokens).mean()),
        baseline_harmless_score=float(refusal_score(baseline_harmless, refusal_tokens).mean()),
        settings={"kl_threshold": kl_threshold, "max_layer_fraction": max_layer_fraction, "require_inducing": float(require_inducing)},
    )
    directions: dict[tuple[int, int], torch.Tensor] = {}
    for layer in layers:
        for index, offset in enumerate(offsets):
            direction = (harmful_states[layer][:, index].double().mean(0) - harmless_states[layer][:, index].double().mean(0)).float()
            directions[(layer, offset)] = direction
            candidate = RefusalCandidate(layer=layer, position=offset)
            with directional_ablation(model, direction):
                candidate.refusal_score = float(refusal_score(last_token_log_probs(model, harmful_val_ids, batch_size), refusal_tokens).mean())
                candidate.kl = mean_kl(baseline_harmless, last_token_log_probs(model, harmless_val_ids, batch_size))
            with steering(model, SteeringVector(directions={layer: direction}), alpha=1.0):
                candidate.steering_score = float(refusal_score(last_token_log_probs(model, harmless_val_ids, batch_size), refusal_tokens).mean())
            if candidate.kl > kl_threshold:
                candidate.reason = f"KL {candidate.kl:.3g} > {kl_threshold}"
            elif require_inducing and candidate.steering_score < 0:
                candidate.reason = "adding it does not induce refusal on harmless prompts"
            else:
                candidate.kept = True
            selection.candidates.append(candidate)
            if progress is not None:
                progress(1)

    kept = [candidate for candidate in selection.candidates if candidate.kept]
    if kept:
        chosen = min(kept, key=lambda candidate: candidate.refusal_score)
        selection.chosen = chosen
        recipe = SteeringRecipe(
            model=model_name,
            position=f"index:{chosen.position}",
            method="refusal_full_selection",
            template_prefix=template.prefix,
            template_suffix=template.suffix,
            template_hash=template.digest(tokenizer),
            dataset_hash=_instruction_pairs_hash(harmful_train, harmless_train),
            num_pairs=min(len(harmful_train), len(harmless_train)),
            extra={"refusal_score": repr(chosen.refusal_score), "kl": repr(chosen.kl), "steering_score": repr(chosen.steering_score)},
        )
        selection.vector = SteeringVector(directions={chosen.layer: directions[(chosen.layer, chosen.position)]}, recipe=recipe)
    logger.info("refusal selection: %d candidates, %d kept", len(selection.candidates), len(kept))
    return selection
