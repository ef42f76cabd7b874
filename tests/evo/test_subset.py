"""Subset sampling on a hand-made correctness matrix."""

from __future__ import annotations

import numpy as np
import pytest

from mergekit_ext.evo.data import MathProblem
from mergekit_ext.evo.subset import binary_entropy, exclude_overlap, select_items, spearman_agreement

# Rows: items, columns: grid points w = 0, 0.5, 1.
CORRECT = np.array([
    [1, 1, 1],  # p = 1, H = 0
    [1, 0, 0],  # p = 1/3
    [1, 1, 0],  # p = 2/3
    [0, 0, 0],  # p = 0
    [1, 0, 1],  # p = 2/3
    [0, 1, 0],  # p = 1/3
])  # fmt: skip


def test_binary_entropy_values():
    np.testing.assert_allclose(binary_entropy(np.array([0.0, 0.5, 1.0, 0.25])), [0.0, 1.0, 0.0, 0.8112781244591328])


def test_entropy_keeps_highest_entropy_in_pool_order():
    selected = select_items(CORRECT, 4, "entropy")
    assert selected.tolist() == [1, 2, 4, 5]


def test_disagreement_puts_parent_disagreement_first():
    # Items 1 and 2 have different verdicts at w = 0 and w = 1.
    assert sorted(select_items(CORRECT, 2, "disagreement").tolist()) == [1, 2]


def test_random_is_seeded_and_distinct():
    first = select_items(CORRECT, 3, "random", seed=5)
    assert first.tolist() == select_items(CORRECT, 3, "random", seed=5).tolist()
    assert len(set(first.tolist())) == 3


def test_subset_larger_than_pool_is_rejected():
    from mergekit_ext.errors import RecipeError

    with pytest.raises(RecipeError, match="exceeds the pool size"):
        select_items(CORRECT, 7, "entropy")


def test_spearman_of_full_pool_is_one():
    correct = np.array([[1, 1, 0], [1, 0, 0], [1, 1, 1], [0, 1, 0]])
    # Pool means per grid point: 0.75, 0.75, 0.25; subset of items 0 and 2: 1, 1, 0.5.
    assert spearman_agreement(correct, np.arange(4)) == pytest.approx(1.0)
    assert spearman_agreement(correct, np.array([0, 2])) == pytest.approx(1.0)
    # Item 3 alone ranks the grid (0, 1, 0) against the pool (0.75, 0.75, 0.25).
    assert spearman_agreement(correct, np.array([3])) == pytest.approx(0.5)


def test_exclude_drops_items_of_evaluation_sets():
    from mergekit_ext.evo.data import load_benchmark

    first = load_benchmark("gsm8k", limit=2)
    pool = [
        MathProblem(id="a", question="  " + first[0].question.upper(), answer="1"),
        MathProblem(id="b", question="What is 2+2?", answer="4"),
        MathProblem(id="c", question=first[1].question, answer="3"),
    ]
    kept, excluded = exclude_overlap(pool, ["gsm8k"])
    assert [problem.id for problem in kept] == ["b"]
    assert excluded == 2
