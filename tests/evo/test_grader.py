"""Grader and benchmark loaders against real data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mergekit_ext.evo.data import BENCHMARK_NAMES, last_boxed_content, load_benchmark
from mergekit_ext.evo.grader import grade

COMPLETIONS = Path(__file__).parent / "data" / "gsm8k_graded_completions.jsonl"


def test_grader_agrees_with_reference_verdicts():
    rows = [json.loads(line) for line in COMPLETIONS.read_text(encoding="utf-8").splitlines()]
    disagreements = [row["idx"] for row in rows if grade(row["completion"], row["gt"]).correct != row["reference_score"]]
    agreement = 1 - len(disagreements) / len(rows)
    assert len(rows) == 334
    assert agreement >= 0.98
    # Known, explained cases: 1044 boxes "1\ \text{inch}" (the reference keeps "1\" and marks it wrong);
    # 1067 answers 24500 cents for a gold of 245 dollars, which the reference accepts as a percentage.
    assert set(disagreements) <= {1044, 1067}


@pytest.mark.parametrize(
    ("completion", "gold", "expected"),
    [
        ("so the answer is \\boxed{18}.", "18", True),
        ("first 3, then \\boxed{\\frac{1}{2}}", "0.5", True),
        ("\\boxed{12} and later \\boxed{13}", "13", True),
        ("\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}", "\\left( 3, \\frac{\\pi}{2} \\right)", True),
        ("no number here", "7", False),
        ("\\boxed{19}", "18", False),
    ],
)
def test_grade_cases(completion, gold, expected):
    assert grade(completion, gold).correct is expected


def test_loaders_read_every_benchmark():
    sizes = {name: len(load_benchmark(name)) for name in BENCHMARK_NAMES}
    assert sizes == {"gsm8k": 1319, "math500": 500, "aime24": 30, "minerva_math": 272}
    gsm8k = load_benchmark("gsm8k", limit=1)[0]
    assert gsm8k.answer == "18"
    assert gsm8k.id == "gsm8k/0"


def test_minerva_gold_comes_from_boxed_solution():
    first = load_benchmark("minerva_math", limit=1)[0]
    assert first.answer == "1.6"
    assert last_boxed_content("a \\boxed{\\frac{1}{2}} b") == "\\frac{1}{2}"
