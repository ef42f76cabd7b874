"""Tiny random chat models for the steering tests."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from mergekit_ext.steer.data import ContrastivePair
from mergekit_ext.zoo.chat_tokenizer import build_chat_tokenizer

NEUTRAL_BODIES = [
    "Describe a quiet harbor at dawn",
    "List three facts about copper",
    "Explain how a bicycle gear works",
    "Write a note about the weather",
    "Summarize a walk through a park",
    "Describe the smell of fresh bread",
    "Explain why leaves change color",
    "Write two lines about a river",
]


@pytest.fixture(scope="session")
def tokenizer():
    # 262 = 256 bytes + 6 special tokens: no merges, so tokenization is byte-wise.
    return build_chat_tokenizer(["hello world"], vocab_size=262)


def make_model(tokenizer, layers: int = 4, hidden: int = 32, tie: bool = False, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=tie,
        initializer_range=0.2,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model = LlamaForCausalLM(config)
    model.eval()
    return model


@pytest.fixture(scope="session")
def model_factory():
    """Return `make_model`, for tests that need a fresh or differently shaped model."""
    return make_model


@pytest.fixture(scope="session")
def model(tokenizer):
    return make_model(tokenizer)


@pytest.fixture(scope="session")
def pairs() -> list[ContrastivePair]:
    return [ContrastivePair(positive=body + ". Answer in capital letters.", negative=body) for body in NEUTRAL_BODIES]


@pytest.fixture()
def model_folder(tmp_path: Path, model, tokenizer) -> Path:
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
