"""Fixtures of the evo tests: tiny random Qwen2 models that share a base, and a problem file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch


@pytest.fixture(autouse=True)
def single_thread():
    """Tiny models decode several times faster on one thread when the CPU is shared."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _tokenizer():
    from transformers import PreTrainedTokenizerFast

    from mergekit_ext.zoo.reasoning_data import (
        EOS_TOKEN, PAD_TOKEN, build_tokenizer, split_problems, tokenizer_corpus,
    )  # fmt: skip

    corpus = tokenizer_corpus(split_problems(0, 200, 0, 0)["train"])
    return PreTrainedTokenizerFast(
        tokenizer_object=build_tokenizer(corpus), eos_token=EOS_TOKEN, pad_token=PAD_TOKEN,
        clean_up_tokenization_spaces=False,
    )


def _save_model(model, tokenizer, folder: Path) -> None:
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """A random base and two children (base plus independent noise), with tokenizer files."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    root = tmp_path_factory.mktemp("tiny_models")
    tokenizer = _tokenizer()
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    base = Qwen2ForCausalLM(config).eval()
    paths = {"base": root / "base"}
    _save_model(base, tokenizer, paths["base"])
    for index, name in enumerate(("long", "short")):
        child = Qwen2ForCausalLM(config).eval()
        child.load_state_dict(base.state_dict())
        generator = torch.Generator().manual_seed(index + 1)
        with torch.no_grad():
            for parameter in child.parameters():
                parameter.add_(0.5 * parameter.std().nan_to_num(0.02).clamp(min=0.02)
                               * torch.randn(parameter.shape, generator=generator))
        paths[name] = root / name
        _save_model(child, tokenizer, paths[name])
    return paths


@pytest.fixture(scope="session")
def problem_file(tmp_path_factory) -> Path:
    """Eight sum problems in the zoo's JSONL layout."""
    path = tmp_path_factory.mktemp("problems") / "problems.jsonl"
    rows = [{"idx": i, "question": f"{i}+{i + 1}+2", "answer": str(2 * i + 3), "level": 3} for i in range(8)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path
