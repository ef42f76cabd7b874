"""Problems, solutions and tokenizer of the reasoning zoo.

A problem is a chain of k one-digit integers joined by `+` and `*`, evaluated
left to right keeping the last digit of every intermediate result (arithmetic
modulo 10), with k from 3 to 8: more operands is harder. Mixing `+` and `*`
makes the order matter, so the answer cannot come from a sum-like average of the
digits and a shallow model has to compose the steps.

The long solution rewrites the chain one step per line, replacing the first
remaining operation by its result, with every line right-aligned to the same
width and the used positions filled with a placeholder (`.`):

    ..........7*5+9      3+4 = 7
    ............5+9      7*5 = 35, last digit 5
    ..............4      5+9 = 14, last digit 4
    \\boxed{4}

The constant width makes every line a copy of the line above at a fixed token
offset, except for the three positions of the operation. The first line is the
same kind of copy of the question, which ends at a fixed offset before the
answer because the prompt text after it is fixed. The 4-layer zoo model learns
this format in 600 fine-tuning steps. A format whose lines shrink (`3+4*5+9`,
`7*5+9`, `5+9`, `4`) needs a copy at an offset that changes on every line, and
the zoo's long model did not learn it in a similar budget. The short solution is the boxed result
alone. Both follow the Evo-L2S evaluation prompt.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

PROMPT_TEMPLATE = (
    "User: {question}\nPlease reason step by step, and put your final answer within \\boxed{{}}.\n\nAssistant:"
)
MIN_OPERANDS = 3
MAX_OPERANDS = 8
EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
# Fills the used positions of a long-solution line. It must stay one token per character.
PLACEHOLDER = "."
# Width of every long-solution line: the longest question (MAX_OPERANDS digits and their operators).
LINE_WIDTH = 2 * MAX_OPERANDS - 1
# 256 byte tokens, 2 special tokens and up to 62 merges (words of the prompt, "\\boxed").
TOKENIZER_VOCAB_SIZE = 320
# Pre-tokenizer pattern of transformers' Qwen2Tokenizer (transformers 5.x).
QWEN2_PRETOKENIZE_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)


@dataclass(frozen=True)
class ReasoningProblem:
    """One chain problem in the field layout of the Qwen2.5-Math JSONL files."""

    idx: int
    question: str
    answer: str
    level: int  # number of operands


OPERATORS = ("+", "*")


def evaluate_step(left: int, operator: str, right: int) -> int:
    """Apply one operation and keep the last digit."""
    return (left + right) % 10 if operator == "+" else (left * right) % 10


def parse_chain(question: str) -> tuple[list[int], list[str]]:
    operands = [int(character) for character in question[0::2]]
    operators = list(question[1::2])
    return operands, operators


def chain_value(question: str) -> int:
    operands, operators = parse_chain(question)
    value = operands[0]
    for operator, operand in zip(operators, operands[1:]):
        value = evaluate_step(value, operator, operand)
    return value


def make_problem(index: int, question: str) -> ReasoningProblem:
    return ReasoningProblem(idx=index, question=question, answer=str(chain_value(question)),
                            level=len(question) // 2 + 1)


def long_solution(question: str) -> str:
    """Return the step-by-step solution: one right-aligned line per operation, then the boxed result.

    Line s (from 1) is the question with its first s operations replaced by
    placeholders and their result, padded on the left to `LINE_WIDTH`.
    """
    operands, operators = parse_chain(question)
    value = operands[0]
    lines = []
    for step, (operator, operand) in enumerate(zip(operators, operands[1:]), start=1):
        value = evaluate_step(value, operator, operand)
        line = PLACEHOLDER * (2 * step) + str(value) + question[2 * step + 1 :]
        lines.append(line.rjust(LINE_WIDTH, PLACEHOLDER))
    return " " + "\n".join(lines) + f"\n\\boxed{{{value}}}"


def short_solution(question: str) -> str:
    """Return the boxed result alone."""
    return f" \\boxed{{{chain_value(question)}}}"


def sample_question(rng: random.Random, level: int) -> str:
    """Draw a chain of `level` digits from 1 to 9 joined by random operators."""
    parts = [str(rng.randint(1, 9))]
    for _ in range(level - 1):
        parts.append(rng.choice(OPERATORS))
        parts.append(str(rng.randint(1, 9)))
    return "".join(parts)


def split_problems(
    seed: int, train_size: int, pool_size: int, test_size: int
) -> dict[str, list[ReasoningProblem]]:
    """Draw disjoint train, search-pool and test sets with levels spread evenly.

    Test and pool questions are unique and never appear in the train split; the
    train split may repeat a question.
    """
    rng = random.Random(seed)
    levels = list(range(MIN_OPERANDS, MAX_OPERANDS + 1))
    held_out: set[str] = set()
    splits: dict[str, list[ReasoningProblem]] = {}
    index = 0
    # Test and pool first, so that they keep the same items when the train size changes.
    for name, size in (("test", test_size), ("pool", pool_size), ("train", train_size)):
        problems: list[ReasoningProblem] = []
        while len(problems) < size:
            question = sample_question(rng, levels[len(problems) % len(levels)])
            if question in held_out:
                continue
            if name != "train":
                held_out.add(question)
            problems.append(make_problem(index, question))
            index += 1
        splits[name] = problems
    return splits


def write_problems(path: Path, problems: list[ReasoningProblem]) -> None:
    with path.open("w", encoding="utf-8") as handle:
        for problem in problems:
            handle.write(json.dumps(asdict(problem)) + "\n")


def build_tokenizer(corpus: list[str], vocab_size: int = TOKENIZER_VOCAB_SIZE) -> Tokenizer:
    """Train a byte-level BPE tokenizer on `corpus` with the Qwen2 tokenizer pipeline.

    transformers 5 loads every `qwen2` checkpoint's tokenizer as `Qwen2Tokenizer`,
    which rebuilds a byte-level BPE from the saved vocabulary and merges with a
    fixed pre-tokenizer. The zoo therefore uses that same pipeline (NFC, the
    Qwen2 split pattern, byte-level bytes, byte-level decoder), so the
    tokenizer round-trips through `AutoTokenizer`. Digits are always single tokens.
    """
    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])  # fmt: skip
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus, trainer)
    return tokenizer


def tokenizer_corpus(problems: list[ReasoningProblem]) -> list[str]:
    """Return the texts the tokenizer is trained on: every prompt with both solutions.

    The placeholders are left out of the long solutions, so BPE learns no merge of
    placeholder runs and every line keeps one token per character (the fixed copy
    offset of the long format depends on it).
    """
    texts = []
    for problem in problems:
        prompt = PROMPT_TEMPLATE.format(question=problem.question)
        texts.append(prompt + long_solution(problem.question).replace(PLACEHOLDER, ""))
        texts.append(prompt + short_solution(problem.question))
    return texts
