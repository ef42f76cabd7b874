"""The small reasoning zoo: Hugging Face folders, tokenizer, disjoint splits, measured children."""

from __future__ import annotations

import json

import pytest

from mergekit_ext.zoo.reasoning import build_reasoning_zoo
from mergekit_ext.zoo.reasoning_data import LINE_WIDTH, PROMPT_TEMPLATE, long_solution, short_solution


@pytest.fixture(scope="module")
def small_zoo(tmp_path_factory):
    return build_reasoning_zoo(tmp_path_factory.mktemp("zoo") / "reasoning", small=True, seed=0, num_threads=1)


def test_zoo_folders_load_with_transformers(small_zoo):
    from transformers import AutoConfig, AutoTokenizer

    for name in ("base", "long", "short"):
        folder = small_zoo / name
        assert (folder / "model.safetensors").is_file()
        assert (folder / "tokenizer.json").is_file()
        assert (folder / "tokenizer_config.json").is_file()
        assert AutoConfig.from_pretrained(folder).architectures == ["Qwen2ForCausalLM"]
    tokenizer = AutoTokenizer.from_pretrained(small_zoo / "long")
    assert tokenizer.eos_token == "<|endoftext|>"
    assert tokenizer.pad_token == "<|pad|>"
    text = PROMPT_TEMPLATE.format(question="3+4*5") + long_solution("3+4*5")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids) == text
    # The long format relies on a fixed copy offset: one token per character of every line.
    solution = long_solution("3+4*5+9*1*2+3*4")
    solution_ids = tokenizer(solution, add_special_tokens=False)["input_ids"]
    lines_text = solution[: solution.index("\\boxed")]
    assert [tokenizer.decode([i]) for i in solution_ids[: len(lines_text)]] == list(lines_text)


def test_solutions_end_with_boxed_result():
    # Left to right, last digit kept: 3+4 = 7, 7*5 = 35 -> 5, 5+9 = 14 -> 4.
    assert long_solution("3+4*5+9") == (
        " ..........7*5+9\n............5+9\n..............4\n\\boxed{4}"
    )
    # 8 operands fill the whole width; every line has LINE_WIDTH characters.
    lines = long_solution("3+4*5+9*1*2+3*4").lstrip().split("\n")
    assert lines[0] == "..7*5+9*1*2+3*4"
    assert lines[-2:] == ["..............4", "\\boxed{4}"]  # results 7, 5, 4, 4, 8, 1, 4
    assert {len(line) for line in lines[:-1]} == {LINE_WIDTH}
    assert short_solution("3+4*5+9") == " \\boxed{4}"


def test_splits_are_disjoint(small_zoo):
    def questions(split):
        lines = (small_zoo / "data" / f"{split}.jsonl").read_text().splitlines()
        return [json.loads(line)["question"] for line in lines]

    test, pool, train = questions("test"), questions("pool"), set(questions("train"))
    assert len(set(test)) == len(test)
    assert not set(test) & set(pool)
    assert not (set(test) | set(pool)) & train


def test_zoo_summary_has_measurements(small_zoo):
    summary = json.loads((small_zoo / "zoo.json").read_text())
    for name in ("base", "long", "short"):
        measured = summary["measured_on_test"][name]
        assert 0.0 <= measured["accuracy"] <= 1.0
        assert measured["mean_tokens"] > 0
    assert build_reasoning_zoo(small_zoo, small=True) == small_zoo  # a finished zoo is reused
