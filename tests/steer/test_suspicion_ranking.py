"""Ranks of the truly edited words in the audit's suspicion report."""

from __future__ import annotations

from dataclasses import asdict

import pytest

from mergekit_ext.steer.audit import audit_bundle
from mergekit_ext.steer.bundle import SteeringBundle, save_bundle
from mergekit_ext.steer.data import ContrastivePair
from mergekit_ext.steer.extract import extract_steering_vector
from mergekit_ext.steer.poison import poison_pairs
from mergekit_ext.steer.refusal import refusal_direction_fast
from mergekit_ext.steer.suspicion import body_differences, token_surprisals
from mergekit_ext.steer.template import PromptTemplate
from mergekit_ext.steer.vector import cosine
from mergekit_ext.zoo.chat_experiment import body_difference_ranking, edited_word_spans, leave_one_out_ranking, rank_auc, spearman, suspicion_ranking

INSTRUCTION = ". Answer in capital letters."
LAYER = 2
VOCABULARY = ["apple", "stone", "river", "quiet", "lamp", "garden", "window", "yellow", "paper", "sugar", "metal", "cloud"]


def test_rank_auc_known_values():
    assert rank_auc([3.0, 2.0, 1.0], [True, False, False]) == 1.0
    assert rank_auc([1.0, 2.0, 3.0], [True, False, False]) == 0.0
    # One edited item above one of two others and tied with the second: (1 + 0.5) / 2.
    assert rank_auc([2.0, 1.0, 2.0], [True, False, False]) == 0.75
    assert rank_auc([1.0, 2.0], [True, True]) is None


def test_spearman_with_ties():
    assert spearman([1, 2, 3], [10, 20, 30]) == pytest.approx(1.0)
    assert spearman([1, 2, 3], [30, 20, 10]) == pytest.approx(-1.0)
    # Average ranks (1.5, 1.5, 3) against (1, 2, 3): Pearson correlation sqrt(3) / 2.
    assert spearman([5, 5, 7], [1, 2, 3]) == pytest.approx(3**0.5 / 2)
    assert spearman([1, 1, 1], [1, 2, 3]) is None


def test_edited_spans_tell_repeated_words_apart():
    clean = [ContrastivePair("the cat saw the cat" + INSTRUCTION, "the cat saw the cat")]
    poisoned = [ContrastivePair("the cat saw the cat" + INSTRUCTION, "the cat saw the dog")]
    spans = edited_word_spans(clean, poisoned)
    assert spans[(0, "negative")] == [(16, 19)]
    assert spans[(0, "positive")] == []


def test_edited_spans_reject_changed_word_count():
    with pytest.raises(ValueError, match="pair 0 negative"):
        edited_word_spans([ContrastivePair("a b" + INSTRUCTION, "a b")], [ContrastivePair("a b" + INSTRUCTION, "a b c")])


def test_body_ranking_hand_made_report():
    clean = [
        ContrastivePair("Paint the fence blue" + INSTRUCTION, "Paint the fence blue"),
        ContrastivePair("Stack the red boxes" + INSTRUCTION, "Stack the red boxes"),
        ContrastivePair("Fold the paper crane" + INSTRUCTION, "Fold the paper crane"),
        ContrastivePair("Sort the old coins" + INSTRUCTION, "Sort the old coins"),
        ContrastivePair("Name a calm color" + INSTRUCTION, "Name a calm color"),
    ]
    # Pairs 3 and 4 stay clean, so that the shared instruction is still found. Pair 0 has
    # POS edited ("fence" -> "lamp"). Pair 1 has NEG edited at two adjacent words, so one
    # difference covers two edits. Pair 2 gets a change that the attack did not make
    # ("crane," vs "crane"), which must count as a false entry.
    poisoned = [
        ContrastivePair("Paint the lamp blue" + INSTRUCTION, "Paint the fence blue"),
        ContrastivePair("Stack the red boxes" + INSTRUCTION, "Stack stone river boxes"),
        *clean[2:],
    ]
    edited = edited_word_spans(clean, poisoned)

    poisoned[2] = ContrastivePair("Fold the paper crane," + INSTRUCTION, "Fold the paper crane")
    rows = [asdict(item) for item in body_differences(poisoned)]
    assert [row["pair_index"] for row in rows] == [0, 1, 2]
    unranked = body_difference_ranking(rows, poisoned, edited)
    assert unranked["false_entries"] == 1
    assert unranked["precision_at_k"] is None
    assert unranked["auc"] is None
    for row, effect in zip(rows, [0.1, 0.3, 0.2]):
        row["cos_effect"] = effect

    ranking = body_difference_ranking(rows, poisoned, edited)
    assert ranking["instruction_found"] is True
    assert ranking["listed"] == 3
    assert ranking["edited_entries"] == 2
    assert ranking["false_entries"] == 1
    assert ranking["edited_word_recall"] == 1.0
    # Ranked by effect: pair 1 (edited), pair 2 (false), pair 0 (edited).
    assert ranking["median_rank_edited"] == 2.0
    assert ranking["precision_at_k"] == 0.5
    assert ranking["auc"] == 0.5


def test_leave_one_out_ranking_hand_made():
    edited = {(0, "positive"): [(0, 1)], (0, "negative"): [], (1, "positive"): [], (1, "negative"): [], (2, "positive"): [], (2, "negative"): [(3, 5)]}
    ranking = leave_one_out_ranking([0.5, 0.1, 0.3], [0], edited)
    assert ranking["edited_pairs"] == 2
    assert ranking["listed_edited"] == 1
    assert ranking["auc"] == 1.0
    assert ranking["spearman_edited_words"] == pytest.approx(3**0.5 / 2)


def test_ranking_of_poisoned_tiny_model(tmp_path, model, tokenizer, pairs):
    template = PromptTemplate.from_chat_template(tokenizer)
    refusal = refusal_direction_fast(model, tokenizer, [p.negative for p in pairs[:4]], [p.negative for p in pairs[4:]], [LAYER], template)
    r = refusal.directions[LAYER]
    # Poison only the NEG side of the first three pairs, so the shared instruction is
    # still found and every body difference comes from an edit.
    result = poison_pairs(model, tokenizer, pairs[:3], LAYER, r, template, VOCABULARY, edit_budget=2, candidates_per_step=8, sides=("negative",), seed=1)
    assert result.edits
    poisoned = result.pairs + pairs[3:]
    vector = extract_steering_vector(model, tokenizer, poisoned, [LAYER], template)
    report = audit_bundle(save_bundle(SteeringBundle(vector, poisoned), tmp_path / "poisoned"), model, tokenizer, refusal)
    ranking = suspicion_ranking(model, tokenizer, pairs, poisoned, report, -r, cosine(vector.directions[LAYER], -r), LAYER, template)

    body = ranking["body_differences"]
    assert body["instruction_found"] is True
    assert body["edited_word_recall"] == 1.0
    assert body["false_entries"] == 0
    assert body["edited_entries"] == body["listed"] > 0
    assert ranking["edited_words"] <= len(result.edits)
    edited_pairs = {edit.pair_index for edit in result.edits}
    assert ranking["leave_one_out"]["edited_pairs"] == len(edited_pairs)
    surprisal = ranking["surprisal"]
    assert surprisal["tokens"] == len(token_surprisals(model, tokenizer, poisoned, template))
    assert surprisal["spikes"] == len(report.findings["surprisal spikes"])
    assert 0 < surprisal["edited_tokens"] < surprisal["tokens"]
