"""Audit verdicts on clean, tampered and poisoned bundles; the poisoning attack.

The "refusal-like" direction here is a mean difference of two groups of made-up
neutral instructions on a random model: it exercises the mechanics only.
"""

from __future__ import annotations

import json

import pytest
import torch

from mergekit_ext.steer.audit import AuditSettings, audit_bundle
from mergekit_ext.steer.bundle import SteeringBundle, save_bundle
from mergekit_ext.steer.data import ContrastivePair
from mergekit_ext.steer.extract import extract_steering_vector
from mergekit_ext.steer.poison import poison_pairs
from mergekit_ext.steer.refusal import refusal_direction_fast
from mergekit_ext.steer.suspicion import body_differences, revert_difference, shared_instruction
from mergekit_ext.steer.template import PromptTemplate
from mergekit_ext.steer.vector import cosine

LAYER = 2
NULL_INSTRUCTIONS = [". Use a calm tone.", ". Reply in one line.", ". Add a short list.", ". Mention a color.", ". Be brief.", ". Write it as a poem."]
GROUP_A = ["Paint the fence blue", "Stack the red boxes", "Fold the paper crane", "Sort the old coins"]
GROUP_B = ["Name a calm color", "Count to five slowly", "Describe a round table", "List two fruits"]
VOCABULARY = ["apple", "stone", "river", "quiet", "lamp", "garden", "window", "yellow", "paper", "sugar", "metal", "cloud"]


@pytest.fixture(scope="module")
def setting(model, tokenizer, pairs):
    template = PromptTemplate.from_chat_template(tokenizer)
    refusal = refusal_direction_fast(model, tokenizer, GROUP_A, GROUP_B, [LAYER], template)
    bodies = [pair.negative for pair in pairs]
    null_sets = [[ContrastivePair(body + instruction, body) for body in bodies] for instruction in NULL_INSTRUCTIONS]
    return template, refusal, null_sets


def _bundle(tmp_path, name, model, tokenizer, pairs, template):
    vector = extract_steering_vector(model, tokenizer, pairs, [LAYER], template)
    return save_bundle(SteeringBundle(vector=vector, pairs=pairs), tmp_path / name)


def test_clean_bundle_passes(tmp_path, model, tokenizer, pairs, setting):
    template, refusal, null_sets = setting
    folder = _bundle(tmp_path, "clean", model, tokenizer, pairs, template)
    report = audit_bundle(folder, model, tokenizer, refusal, null_sets)
    results = {check.name: check.passed for check in report.checks}
    assert results == {"file hashes": True, "recipe hashes": True, "re-derivation": True, "refusal alignment": True, "pair bodies": True, "behaviour": None}
    assert report.passed
    assert report.checks[2].values[str(LAYER)]["cosine"] >= 0.9999
    assert "not that it is safe" in report.to_markdown()
    assert json.loads(report.to_json())["passed"] is True


def test_tampered_bundle_fails(tmp_path, model, tokenizer, pairs, setting):
    template, refusal, null_sets = setting
    folder = _bundle(tmp_path, "tampered", model, tokenizer, pairs, template)
    lines = (folder / "pairs.jsonl").read_text().splitlines()
    lines[0] = json.dumps({"positive": "Stack the red boxes. Answer in capital letters.", "negative": "Stack the red boxes"})
    (folder / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    report = audit_bundle(folder, model, tokenizer)
    results = {check.name: check.passed for check in report.checks}
    assert results["file hashes"] is False
    assert results["recipe hashes"] is False
    assert results["re-derivation"] is False
    assert not report.passed


def test_poison_raises_alignment_and_audit_catches_it(tmp_path, model, tokenizer, pairs, setting):
    template, refusal, null_sets = setting
    result = poison_pairs(model, tokenizer, pairs, LAYER, refusal.directions[LAYER], template, VOCABULARY, edit_budget=5, candidates_per_step=12, seed=1)
    assert result.cos_after > result.cos_before + 0.1
    for index in range(len(pairs)):
        for side in ("positive", "negative"):
            assert sum(1 for edit in result.edits if edit.pair_index == index and edit.side == side) <= 5
    # Every positive text keeps its attribute instruction untouched.
    assert all(pair.positive.endswith(". Answer in capital letters.") for pair in result.pairs)

    vector = extract_steering_vector(model, tokenizer, result.pairs, [LAYER], template)
    assert cosine(vector.directions[LAYER], -refusal.directions[LAYER]) == pytest.approx(result.cos_after, abs=1e-4)

    folder = save_bundle(SteeringBundle(vector=vector, pairs=result.pairs), tmp_path / "poisoned")
    report = audit_bundle(folder, model, tokenizer, refusal, null_sets)
    results = {check.name: check.passed for check in report.checks}
    # Consistency holds for poisoned texts: re-derivation alone cannot catch the attack.
    assert results["re-derivation"] is True
    assert results["file hashes"] is True
    assert results["pair bodies"] is False
    assert results["refusal alignment"] is False
    assert report.checks[3].values[str(LAYER)]["percentile"] == 100.0
    findings = report.findings["POS/NEG body differences"]
    assert len(findings) >= 1
    assert max(row["cos_effect"] for row in findings) > 0


def test_body_differences_and_revert():
    pairs = [
        ContrastivePair("Describe a red lamp. Be brief.", "Describe a red lamp"),
        ContrastivePair("Describe a blue river. Be brief.", "Describe a green river"),
    ]
    assert shared_instruction(pairs) == (". Be brief.", "suffix")
    (difference,) = body_differences(pairs)
    assert (difference.pair_index, difference.positive_words, difference.negative_words) == (1, "blue", "green")
    repaired = revert_difference(pairs[1], difference, ". Be brief.", "suffix")
    assert repaired.positive == "Describe a green river. Be brief."
    assert repaired.negative == "Describe a blue river"


def test_behaviour_check_runs(tmp_path, model, tokenizer, pairs, setting):
    template, refusal, _ = setting
    folder = _bundle(tmp_path, "clean", model, tokenizer, pairs, template)
    report = audit_bundle(folder, model, tokenizer, harmful_prompts=GROUP_A[:2], settings=AuditSettings(max_new_tokens=4))
    behaviour = next(check for check in report.checks if check.name == "behaviour")
    # A random model never writes a refusal phrase in four tokens, so both rates are 0.
    assert behaviour.values == {"refusal_rate_without": 0.0, "refusal_rate_with": 0.0}
    assert behaviour.passed is True

