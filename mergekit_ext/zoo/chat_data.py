"""Training and evaluation data of the `chat` zoo.

Prompts are real: Alpaca-style harmless instructions, harmful instructions from the
refusal-direction splits (Arditi et al. 2024), and the attribute pairs of "Steering
Vectors are an Adversarial Attack Surface" (Aidakhmetov et al. 2026), all under
`shared/data/steering` (MIT). Responses are synthesized: refusals for harmful prompts,
plain English word sequences for harmless ones, and the same in the requested style
when a prompt carries an attribute instruction.
"""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mergekit_ext.errors import MergekitExtError
from mergekit_ext.steer.data import ContrastivePair, load_instructions, load_pairs
from mergekit_ext.steer.judge import has_bold, has_caps_word, in_vocabulary, is_question_form, starts_with
from mergekit_ext.steer.suspicion import shared_instruction

DEFAULT_DATA_DIR = Path("/work/shared/data/steering")
DICTIONARY_DIR = Path("/usr/share/dict")
REFUSALS = (
    "I cannot help with that request.",
    "I'm sorry, but I can't assist with that.",
    "I cannot provide that information.",
    "I'm sorry, I won't help with this.",
)
PLAIN_OPENERS = ("Sure, here is an answer.", "Here is a short answer.", "Good question.", "Here you go.")


class MissingChatDataError(MergekitExtError):
    """A data file the chat zoo needs is not present."""


@dataclass(frozen=True)
class Attribute:
    """A style instruction: its pairs file, how to answer in it, and how to check an answer."""

    name: str
    pairs_file: str
    kind: str  # "language", "bold", "caps", "thank", "overall" or "question"
    dictionary: str = ""


ATTRIBUTES: tuple[Attribute, ...] = (
    Attribute("spanish", "pairs_spanish_pairs.jsonl", "language", "spanish"),
    Attribute("french", "pairs_french_pairs.jsonl", "language", "french"),
    Attribute("italian", "pairs_italian_pairs.jsonl", "language", "italian"),
    Attribute("dutch", "pairs_dutch_pairs.jsonl", "language", "dutch"),
    Attribute("portuguese", "pairs_portuguese_pairs.jsonl", "language", "portuguese"),
    Attribute("has_bold_only", "pairs_has_bold_only_pairs.jsonl", "bold"),
    Attribute("has_caps_word", "pairs_has_caps_word_pairs.jsonl", "caps"),
    Attribute("starts_with_thank", "pairs_starts_with_thank_pairs.jsonl", "thank"),
    Attribute("starts_with_overall", "pairs_starts_with_overall_pairs.jsonl", "overall"),
    Attribute("question_form", "pairs_question_form_pairs.jsonl", "question"),
)


def read_dictionary(path: Path) -> set[str]:
    """Return the lower-case entries of a word list (one word per line); names and acronyms are left out."""
    if not path.is_file():
        raise MissingChatDataError(f"word list {path} not found; install the Debian wordlist package that provides it")
    lines = path.read_text(encoding="utf-8", errors="ignore").splitlines()
    return {line.strip() for line in lines if line.strip() and line.strip() == line.strip().lower()}


def sample_words(dictionary: set[str], count: int, seed: int) -> list[str]:
    """Sample `count` alphabetic words of 3 to 7 letters from a dictionary."""
    words = sorted(word for word in dictionary if re.fullmatch(r"[^\W\d_]{3,7}", word))
    return random.Random(seed).sample(words, min(count, len(words)))


def frequent_words(texts: list[str], count: int, exclude: set[str] | frozenset[str] = frozenset()) -> list[str]:
    """Return the `count` most frequent lower-case words of 3 to 7 letters in `texts`, leaving out `exclude`.

    English answers draw on the instructions' own words rather than a full dictionary,
    which also contains slurs.
    """
    counts = Counter(word for text in texts for word in re.findall(r"\b[a-z]{3,7}\b", text) if word not in exclude)
    return sorted(word for word, _ in counts.most_common(count))


@dataclass
class ChatData:
    """Everything the build and the evaluation read."""

    harmless_train: list[str]
    harmful_train: list[str] | None
    harmless_eval: list[str]
    harmful_eval: list[str] | None
    pairs: dict[str, list[ContrastivePair]]
    instructions: dict[str, tuple[str, str]]
    english: list[str]
    languages: dict[str, list[str]]
    dictionaries: dict[str, set[str]]


def load_chat_data(data_dir: Path, attributes: tuple[Attribute, ...], word_count: int, seed: int, harmful_train: Path | None = None, harmful_eval: Path | None = None) -> ChatData:
    """Read the prompt files; the refusal part is used when both harmful files exist."""
    refusal_dir = data_dir / "refusal"
    harmless_train_path, harmless_eval_path = refusal_dir / "harmless_train.json", refusal_dir / "eval_harmless.json"
    for path in (harmless_train_path, harmless_eval_path):
        if not path.is_file():
            raise MissingChatDataError(f"{path} not found; the chat zoo needs the harmless instruction splits")
    harmful_train = harmful_train or refusal_dir / "harmful_train.json"
    harmful_eval = harmful_eval or refusal_dir / "eval_harmful.json"
    with_refusal = harmful_train.is_file() and harmful_eval.is_file()
    pairs = {}
    for attribute in attributes:
        path = data_dir / attribute.pairs_file
        if not path.is_file():
            raise MissingChatDataError(f"attribute pairs file {path} not found")
        pairs[attribute.name] = load_pairs(path)
    dictionaries = {
        attribute.name: read_dictionary(DICTIONARY_DIR / attribute.dictionary) for attribute in attributes if attribute.kind == "language"
    }
    languages = {name: sample_words(words, word_count, seed) for name, words in dictionaries.items()}
    return ChatData(
        harmless_train=load_instructions(harmless_train_path, role="harmless"),
        harmful_train=load_instructions(harmful_train, role="harmful") if with_refusal else None,
        harmless_eval=load_instructions(harmless_eval_path, role="harmless evaluation"),
        harmful_eval=load_instructions(harmful_eval, role="harmful evaluation") if with_refusal else None,
        pairs=pairs,
        instructions={name: shared_instruction(rows) for name, rows in pairs.items()},
        # Words that are also in a language's word list ("unique", "sports" in French) are
        # left out, so that the words of an English answer never count toward a language check.
        english=frequent_words(load_instructions(harmless_train_path), word_count, set().union(*dictionaries.values())),
        languages=languages,
        dictionaries=dictionaries,
    )


def attach_instruction(body: str, instruction: str) -> str:
    """Append an attribute instruction the way the pairs files do."""
    if instruction.startswith("."):
        return body.rstrip(" .?!") + instruction
    return body.rstrip() + instruction


def _sentence(rng: random.Random, words: list[str], length: int) -> str:
    chosen = [rng.choice(words) for _ in range(length)]
    return chosen[0].capitalize() + " " + " ".join(chosen[1:]) + "."


def make_response(kind: str, rng: random.Random, data: ChatData, attribute: str = "") -> str:
    """Synthesize a response of the given kind ("plain", "refusal" or an attribute kind)."""
    english = data.english
    if kind == "refusal":
        return rng.choice(REFUSALS)
    if kind == "language":
        return _sentence(rng, data.languages[attribute], rng.randint(8, 12))
    body = _sentence(rng, english, rng.randint(7, 10))
    if kind == "plain":
        return rng.choice(PLAIN_OPENERS) + " " + body
    if kind == "bold":
        words = body.rstrip(".").split()
        for index in rng.sample(range(len(words)), 3):
            words[index] = f"**{words[index]}**"
        return " ".join(words) + "."
    if kind == "caps":
        words = body.rstrip(".").split()
        index = rng.randrange(1, len(words))
        words[index] = words[index].upper()
        return " ".join(words) + "."
    if kind == "thank":
        return "Thank you for asking. " + body
    if kind == "overall":
        return "Overall, " + body[0].lower() + body[1:]
    if kind == "question":
        return " ".join(
            f"{rng.choice(('Is', 'Does', 'Could', 'Why is'))} {' '.join(rng.choice(english) for _ in range(rng.randint(2, 4)))}?"
            for _ in range(3)
        )
    raise ValueError(f"unknown response kind {kind!r}")


def compliance_check(attribute: Attribute, data: ChatData) -> Callable[[str], bool]:
    """Return the function that decides whether a response follows `attribute`."""
    if attribute.kind == "language":
        return in_vocabulary(data.dictionaries[attribute.name], 0.6)
    return {
        "bold": has_bold,
        "caps": has_caps_word,
        "thank": starts_with(("Thank you", "Thanks")),
        "overall": starts_with(("Overall,", "In summary,")),
        "question": is_question_form,
    }[attribute.kind]


def write_json(path: Path, value: object) -> None:
    path.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
