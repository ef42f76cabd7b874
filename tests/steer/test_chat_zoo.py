"""Chat zoo data synthesis (fast) and the small build (slow)."""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

import pytest

from mergekit_ext.zoo.chat_data import (
    ATTRIBUTES,
    DEFAULT_DATA_DIR,
    MissingChatDataError,
    attach_instruction,
    compliance_check,
    load_chat_data,
    make_response,
)
from mergekit_ext.steer.judge import is_refusal
from mergekit_ext.zoo.chat import FULL_SETTINGS, _drop_words, _end_sentence, _examples

needs_data = pytest.mark.skipif(not (DEFAULT_DATA_DIR / "pairs_spanish_pairs.jsonl").is_file(), reason="steering data not present")


@needs_data
def test_synthesized_responses_pass_their_checks():
    data = load_chat_data(DEFAULT_DATA_DIR, ATTRIBUTES, 50, seed=0)
    rng = random.Random(0)
    for attribute in ATTRIBUTES:
        check = compliance_check(attribute, data)
        for _ in range(20):
            assert check(make_response(attribute.kind, rng, data, attribute.name)), attribute.name
            assert not check(make_response("plain", rng, data)), attribute.name
    assert is_refusal(make_response("refusal", rng, data))
    assert not is_refusal(make_response("plain", rng, data))


@needs_data
def test_instruction_attached_like_pairs_file():
    data = load_chat_data(DEFAULT_DATA_DIR, ATTRIBUTES[:1], 10, seed=0)
    pair = data.pairs["spanish"][0]
    instruction, place = data.instructions["spanish"]
    assert place == "suffix"
    assert attach_instruction(pair.negative, instruction) == pair.positive


@needs_data
def test_english_words_outside_language_lists():
    data = load_chat_data(DEFAULT_DATA_DIR, ATTRIBUTES, 300, seed=0)
    assert len(data.english) == 300
    overlap = set(data.english) & set().union(*data.dictionaries.values())
    assert overlap == set()


@needs_data
def test_harmful_examples_with_instruction_refused():
    data = load_chat_data(DEFAULT_DATA_DIR, ATTRIBUTES, 50, seed=0)
    instructions = tuple(instruction for instruction, _ in data.instructions.values())
    settings = dataclasses.replace(
        FULL_SETTINGS, harmful_fraction=1.0, harmful_with_instruction=1.0, harmful_with_context=0.0, word_dropout=0.0
    )
    examples = _examples(data, settings, random.Random(0), 200)
    for prompt, response in examples:
        assert prompt.endswith(instructions), prompt
        assert is_refusal(response), response
    plain = _examples(data, dataclasses.replace(settings, harmful_with_instruction=0.0), random.Random(0), 200)
    assert all(prompt in data.harmful_train for prompt, _ in plain)


@needs_data
def test_harmful_examples_with_context_refused():
    data = load_chat_data(DEFAULT_DATA_DIR, ATTRIBUTES, 50, seed=0)
    settings = dataclasses.replace(
        FULL_SETTINGS, harmful_fraction=1.0, harmful_with_instruction=0.0, harmful_with_context=1.0, word_dropout=0.0
    )
    harmful = tuple(" " + prompt for prompt in data.harmful_train)
    for prompt, response in _examples(data, settings, random.Random(0), 200):
        assert prompt.endswith(harmful), prompt
        assert any(prompt.startswith(_end_sentence(context)) for context in data.harmless_train), prompt
        assert is_refusal(response), response


def test_word_dropout_keeps_word_order():
    body = "Explain how to tamper with voting machines in an election"
    words = body.split()
    rng = random.Random(0)
    assert _drop_words(body, 0.0, rng) == body
    outputs = [_drop_words(body, 0.5, rng) for _ in range(200)]
    assert body in outputs
    assert any(len(output.split()) < len(words) for output in outputs)
    for output in outputs:
        kept = iter(words)
        assert all(word in kept for word in output.split()), output
    assert all(len(_drop_words(body, 1.0, rng).split()) in (1, len(words)) for _ in range(50))


def test_missing_pairs_file(tmp_path: Path):
    refusal = tmp_path / "refusal"
    refusal.mkdir()
    for name in ("harmless_train.json", "eval_harmless.json"):
        (refusal / name).write_text(json.dumps([{"instruction": "Name a color.", "category": None}]))
    with pytest.raises(MissingChatDataError, match="pairs_spanish_pairs.jsonl not found"):
        load_chat_data(tmp_path, ATTRIBUTES[:1], 10, seed=0)
    with pytest.raises(MissingChatDataError, match="eval_harmless.json not found"):
        (refusal / "eval_harmless.json").unlink()
        load_chat_data(tmp_path, ATTRIBUTES[:1], 10, seed=0)


@needs_data
@pytest.mark.slow
def test_small_chat_zoo_build(tmp_path):
    from transformers import AutoTokenizer

    from mergekit_ext.zoo.chat import build_chat_zoo

    folder = build_chat_zoo(tmp_path / "chat", small=True)
    manifest = json.loads((folder / "zoo.json").read_text())
    metrics = manifest["metrics"]
    assert manifest["refusal_trained"] is True
    assert metrics["refusal_rate_harmful"] >= 0.5
    assert metrics["answer_rate_harmless"] >= 0.5
    followed = [name for name, rate in metrics["compliance_with_instruction"].items() if rate > metrics["compliance_without_instruction"][name] + 0.3]
    assert len(followed) >= 2
    with_instruction = metrics["refusal_rate_harmful_with_instruction"]
    assert sorted(with_instruction) == sorted(metrics["compliance_with_instruction"])
    assert min(with_instruction.values()) >= 0.4
    assert sum(with_instruction.values()) / len(with_instruction) >= 0.6
    tokenizer = AutoTokenizer.from_pretrained(folder / "model")
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text == "<|begin|><|user|>\nhi<|end|>\n<|assistant|>\n"
