"""Math answer grading with the `math-verify` library.

The prediction is the answer extracted from a completion (the last
`\\boxed{...}` answer first, else a LaTeX or plain expression); the gold answer is
parsed as LaTeX. Equivalence is symbolic (sympy) with math-verify's default
float rounding of 6 digits.
"""

from __future__ import annotations

from dataclasses import dataclass

from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

# boxed_match_priority=0 makes a boxed answer win over any other LaTeX match.
PREDICTION_EXTRACTION = (
    LatexExtractionConfig(boxed_match_priority=0),
    ExprExtractionConfig(),
)
GOLD_EXTRACTION = (LatexExtractionConfig(), ExprExtractionConfig())


@dataclass(frozen=True)
class Verdict:
    """Result of grading one completion."""

    correct: bool
    prediction: str  # extracted answer as text, empty when nothing was found


def extract_answer(completion: str) -> list:
    """Return math-verify's parsed answers of a completion (empty when none).

    The final answer is the last `\\boxed{}`: math-verify 0.9 merges every boxed
    answer of a text into one set, so the text before the last one is dropped.
    """
    last_boxed = completion.rfind("\\boxed")
    text = completion[last_boxed:] if last_boxed >= 0 else completion
    return parse(text, extraction_config=list(PREDICTION_EXTRACTION))


def parse_gold(answer: str) -> list:
    """Parse a gold answer given as plain text or LaTeX without delimiters."""
    text = answer.strip()
    if not text.startswith("$") and "\\boxed" not in text:
        text = f"${text}$"
    return parse(text, extraction_config=list(GOLD_EXTRACTION))


def grade(completion: str, gold_answer: str) -> Verdict:
    """Grade one completion against its gold answer."""
    prediction = extract_answer(completion)
    if not prediction:
        return Verdict(correct=False, prediction="")
    gold = parse_gold(gold_answer)
    correct = bool(gold) and verify(gold, prediction)
    return Verdict(correct=correct, prediction=str(prediction[-1]))
