"""Red-team poisoning of contrastive pairs, for testing audit defenses.

The attack substitutes ordinary words in the POS and NEG texts (never inside the
attribute instruction) so that the extracted vector v = mean(POS) - mean(NEG) turns
towards -r, the direction that suppresses refusal. It is a greedy search: each step
tries a random sample of (word position, replacement) candidates for one text and
keeps the one that raises cos(v, -r) most, up to `edit_budget` substitutions per text.
"""

from __future__ import annotations

import logging
import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from mergekit_ext.errors import RecipeError
from mergekit_ext.steer.activations import collect_block_outputs
from mergekit_ext.steer.data import ContrastivePair
from mergekit_ext.steer.extract import encode_texts
from mergekit_ext.steer.suspicion import shared_instruction
from mergekit_ext.steer.template import PromptTemplate
from mergekit_ext.steer.vector import cosine

logger = logging.getLogger(__name__)

_WORD = re.compile(r"[A-Za-z]+")


def ordinary_words(path: str | Path = "/usr/share/dict/american-english", count: int = 2000, seed: int = 0) -> list[str]:
    """Sample `count` lower-case alphabetic words of 3 to 8 letters from a word list."""
    source = Path(path)
    if not source.is_file():
        raise RecipeError(f"word list {source} not found; install a Debian wordlist package (wamerican) or pass --vocabulary")
    words = sorted({line.strip() for line in source.read_text(encoding="utf-8", errors="ignore").splitlines() if re.fullmatch(r"[a-z]{3,8}", line.strip())})
    return random.Random(seed).sample(words, min(count, len(words)))


@dataclass(frozen=True)
class WordEdit:
    """One substitution made by the attack."""

    pair_index: int
    side: str
    old_word: str
    new_word: str


@dataclass
class PoisonResult:
    """Poisoned pairs, the cosine to -r before and after, and every edit made."""

    pairs: list[ContrastivePair]
    cos_before: float
    cos_after: float
    edits: list[WordEdit] = field(default_factory=list)


def _editable_spans(text: str, protected: tuple[int, int] | None) -> list[tuple[int, int]]:
    spans = [match.span() for match in _WORD.finditer(text)]
    if protected is None:
        return spans
    return [span for span in spans if span[1] <= protected[0] or span[0] >= protected[1]]


def poison_pairs(
    model: nn.Module,
    tokenizer: object,
    pairs: list[ContrastivePair],
    layer: int,
    refusal_direction: torch.Tensor,
    template: PromptTemplate,
    vocabulary: list[str],
    edit_budget: int = 5,
    candidates_per_step: int = 16,
    sides: tuple[str, ...] = ("positive", "negative"),
    position: str = "last",
    seed: int = 0,
    batch_size: int = 16,
    progress: Callable[[int], None] | None = None,
) -> PoisonResult:
    """Run the greedy substitution attack; `progress` is called once per text."""
    if edit_budget < 1:
        raise RecipeError(f"edit budget {edit_budget} must be at least 1")
    if not vocabulary:
        raise RecipeError("the attack vocabulary is empty")
    generator = random.Random(seed)
    target = -refusal_direction.double()
    texts = {side: [getattr(pair, side) for pair in pairs] for side in sides}
    texts.setdefault("positive", [pair.positive for pair in pairs])
    texts.setdefault("negative", [pair.negative for pair in pairs])
    activations = {
        side: collect_block_outputs(model, encode_texts(tokenizer, template, texts[side]), [layer], position, batch_size)[layer][:, 0].double()
        for side in ("positive", "negative")
    }
    count = len(pairs)
    vector = activations["positive"].mean(0) - activations["negative"].mean(0)
    cos_before = cosine(vector, target)
    current = cos_before
    instruction, place = shared_instruction(pairs)
    edits: list[WordEdit] = []

    for index in range(count):
        for side in sides:
            sign = 1.0 if side == "positive" else -1.0
            for _ in range(edit_budget):
                text = texts[side][index]
                protected = None
                if side == "positive" and instruction:
                    start = len(text) - len(instruction) if place == "suffix" else 0
                    protected = (start, start + len(instruction))
                spans = _editable_spans(text, protected)
                if not spans:
                    break
                candidates = []
                for _ in range(candidates_per_step):
                    begin, end = generator.choice(spans)
                    word = generator.choice(vocabulary)
                    if word != text[begin:end]:
                        candidates.append((text[:begin] + word + text[end:], text[begin:end], word))
                if not candidates:
                    break
                new_states = collect_block_outputs(
                    model, encode_texts(tokenizer, template, [candidate[0] for candidate in candidates]), [layer], position, batch_size
                )[layer][:, 0].double()
                old_state = activations[side][index]
                trial_vectors = vector + sign * (new_states - old_state) / count
                scores = torch.nn.functional.cosine_similarity(trial_vectors, target.unsqueeze(0), dim=-1)
                best = int(scores.argmax())
                if float(scores[best]) <= current:
                    break
                current = float(scores[best])
                vector = trial_vectors[best]
                activations[side][index] = new_states[best]
                texts[side][index] = candidates[best][0]
                edits.append(WordEdit(index, side, candidates[best][1], candidates[best][2]))
            if progress is not None:
                progress(1)

    poisoned = [ContrastivePair(positive=texts["positive"][i], negative=texts["negative"][i]) for i in range(count)]
    logger.info("poisoning: cos(v, -r) %.4f -> %.4f with %d edits", cos_before, current, len(edits))
    return PoisonResult(pairs=poisoned, cos_before=cos_before, cos_after=current, edits=edits)
