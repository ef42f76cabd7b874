"""Token-level suspicion signals for the contrastive pairs of a steering bundle."""

from __future__ import annotations

import difflib
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from mergekit_ext.steer.data import ContrastivePair
from mergekit_ext.steer.template import PromptTemplate

_TOKEN = re.compile(r"\S+")


def split_words(text: str) -> list[str]:
    """Split on whitespace, keeping punctuation attached (edits are made at this level)."""
    return _TOKEN.findall(text)


@dataclass(frozen=True)
class BodyDifference:
    """A change between the POS and NEG texts of one pair other than the shared instruction."""

    pair_index: int
    operation: str
    positive_words: str
    negative_words: str
    positive_span: tuple[int, int]
    negative_span: tuple[int, int]


def shared_instruction(pairs: list[ContrastivePair]) -> tuple[str, str]:
    """Return (text, place) of the instruction most pairs add to NEG: place is "suffix" or "prefix".

    A clean pair is POS = NEG + instruction (or instruction + NEG), so the instruction is
    the most common such remainder over all pairs.
    """
    counts: Counter[tuple[str, str]] = Counter()
    for pair in pairs:
        if pair.positive.startswith(pair.negative):
            counts[(pair.positive[len(pair.negative) :], "suffix")] += 1
        elif pair.positive.endswith(pair.negative):
            counts[(pair.positive[: -len(pair.negative)], "prefix")] += 1
    return counts.most_common(1)[0][0] if counts else ("", "suffix")


def _strip_instruction(positive: str, instruction: str, place: str) -> str:
    if instruction and place == "suffix" and positive.endswith(instruction):
        return positive[: -len(instruction)]
    if instruction and place == "prefix" and positive.startswith(instruction):
        return positive[len(instruction) :]
    return positive


def body_differences(pairs: list[ContrastivePair]) -> list[BodyDifference]:
    """List word-level differences between POS (instruction removed) and NEG."""
    instruction, place = shared_instruction(pairs)
    found: list[BodyDifference] = []
    for index, pair in enumerate(pairs):
        positive = split_words(_strip_instruction(pair.positive, instruction, place))
        negative = split_words(pair.negative)
        matcher = difflib.SequenceMatcher(a=negative, b=positive, autojunk=False)
        for operation, i1, i2, j1, j2 in matcher.get_opcodes():
            if operation != "equal":
                found.append(
                    BodyDifference(index, operation, " ".join(positive[j1:j2]), " ".join(negative[i1:i2]), (j1, j2), (i1, i2))
                )
    return found


def revert_difference(pair: ContrastivePair, difference: BodyDifference, instruction: str, place: str) -> ContrastivePair:
    """Return two repaired pairs in one: POS with the NEG words, and NEG with the POS words.

    The positive field carries POS repaired to agree with NEG at this difference; the
    negative field carries NEG repaired to agree with POS. Words are re-joined with single
    spaces, so texts with other whitespace change slightly beyond the edit.
    """
    body = _strip_instruction(pair.positive, instruction, place)
    positive, negative = split_words(body), split_words(pair.negative)
    j1, j2 = difference.positive_span
    i1, i2 = difference.negative_span
    repaired_body = " ".join(positive[:j1] + negative[i1:i2] + positive[j2:])
    repaired_positive = repaired_body + instruction if place == "suffix" else instruction + repaired_body
    repaired_negative = " ".join(negative[:i1] + positive[j1:j2] + negative[i2:])
    return ContrastivePair(positive=repaired_positive, negative=repaired_negative)


@dataclass(frozen=True)
class TokenSurprisal:
    """Surprisal (nats) of one text token; `token_index` counts from the first token of the text."""

    pair_index: int
    side: str
    token_index: int
    token_id: int
    surprisal: float


@dataclass(frozen=True)
class SurprisalSpike:
    """A text token whose surprisal is far above the corpus mean."""

    pair_index: int
    side: str
    token: str
    surprisal: float
    z_score: float


@torch.no_grad()
def token_surprisals(model: nn.Module, tokenizer: object, pairs: list[ContrastivePair], template: PromptTemplate) -> list[TokenSurprisal]:
    """Compute the surprisal of every text token of every POS and NEG text in its template.

    With an empty template prefix the first text token has no context and is left out.
    """
    device = next(model.parameters()).device
    prefix = template.prefix_ids(tokenizer)
    records: list[TokenSurprisal] = []
    for index, pair in enumerate(pairs):
        for side, text in (("positive", pair.positive), ("negative", pair.negative)):
            ids = template.token_ids(tokenizer, text)
            text_ids = ids[len(prefix) : len(ids) - len(template.suffix_ids(tokenizer))]
            logits = model(input_ids=torch.tensor([ids], device=device)).logits[0].double()
            log_probs = torch.log_softmax(logits[:-1], dim=-1)
            targets = torch.tensor(ids[1:], device=device)
            surprisal = -log_probs[torch.arange(len(targets), device=device), targets]
            start = max(len(prefix) - 1, 0)
            for offset, token_id in enumerate(text_ids):
                position = start + offset
                if 0 <= position < len(surprisal) and (len(prefix) > 0 or offset > 0):
                    records.append(TokenSurprisal(index, side, offset, token_id, float(surprisal[position])))
    return records


def standard_scores(values: Sequence[float]) -> list[float]:
    """Return (value - mean) / std for each value (unbiased std), all 0 without spread or with one value."""
    if len(values) < 2:
        return [0.0] * len(values)
    tensor = torch.tensor(values, dtype=torch.float64)
    mean, std = float(tensor.mean()), float(tensor.std())
    return [(value - mean) / std if std > 0 else 0.0 for value in values]


def surprisal_spikes(
    model: nn.Module, tokenizer: object, pairs: list[ContrastivePair], template: PromptTemplate, z_threshold: float = 3.0
) -> list[SurprisalSpike]:
    """Return text tokens with surprisal (nats) more than `z_threshold` std above the mean of all text tokens."""
    records = token_surprisals(model, tokenizer, pairs, template)
    if len(records) < 2:
        return []
    spikes = []
    for record, z_score in zip(records, standard_scores([record.surprisal for record in records])):
        if z_score > z_threshold:
            spikes.append(SurprisalSpike(record.pair_index, record.side, tokenizer.decode([record.token_id]), record.surprisal, z_score))  # type: ignore[attr-defined]
    return sorted(spikes, key=lambda spike: -spike.z_score)
