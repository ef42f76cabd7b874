"""Generated-length accounting: count up to the first stop token, never padding."""

from __future__ import annotations

import pytest
import torch

from mergekit_ext.evo import generation
from mergekit_ext.evo.backends import load_model, load_tokenizer
from mergekit_ext.evo.generation import GenerationSettings, count_generated, format_prompt, generate_greedy

EOS = 1


def test_length_with_pad_equal_to_eos():
    # Rows finished early are padded with the pad token, here equal to eos.
    generated = torch.tensor([
        [5, 6, EOS, EOS, EOS, EOS],
        [5, 6, 7, 8, 9, EOS],
        [EOS, EOS, EOS, EOS, EOS, EOS],
        [5, 6, 7, 8, 9, 10],
    ])  # fmt: skip
    counts = count_generated(generated, stop_ids=[EOS], max_new_tokens=6)
    assert counts[0] == (3, False)
    assert counts[1] == (6, False)
    assert counts[2] == (1, False)
    assert counts[3] == (6, True)


def test_extra_stop_token_ends_count():
    generated = torch.tensor([[5, 9, 6, EOS, 0, 0]])
    assert count_generated(generated, stop_ids=[EOS, 9], max_new_tokens=6) == [(2, False)]


def test_generate_counts_match_token_ids(tiny_models):
    tokenizer = load_tokenizer(str(tiny_models["long"]))
    model = load_model(str(tiny_models["long"]), torch.device("cpu"), torch.float32)
    settings = GenerationSettings(max_new_tokens=12, batch_size=3)
    prompts = [format_prompt(tokenizer, question, settings) for question in ("1+2", "3+4+5", "9+9+9+9")]
    generations = generate_greedy(model, tokenizer, prompts, settings)
    for generation in generations:
        assert generation.num_tokens == len(generation.token_ids)
        assert generation.truncated == (tokenizer.eos_token_id not in generation.token_ids)
        if generation.truncated:
            assert generation.num_tokens == 12
        else:
            assert generation.token_ids.index(tokenizer.eos_token_id) == generation.num_tokens - 1


def test_pad_equal_to_eos_gives_same_lengths(tiny_models):
    # The same prompts decoded with pad = eos and with a distinct pad token give equal lengths.
    tokenizer = load_tokenizer(str(tiny_models["short"]))
    model = load_model(str(tiny_models["short"]), torch.device("cpu"), torch.float32)
    settings = GenerationSettings(max_new_tokens=10, batch_size=4)
    prompts = [format_prompt(tokenizer, q, settings) for q in ("1+1", "2+2+2", "3+3+3+3+3", "4")]
    distinct = generate_greedy(model, tokenizer, prompts, settings)
    tokenizer.pad_token = tokenizer.eos_token
    same = generate_greedy(model, tokenizer, prompts, settings)
    assert [g.num_tokens for g in same] == [g.num_tokens for g in distinct]


def test_out_of_memory_halves_the_batch(tiny_models, monkeypatch):
    # A fake device that runs out of memory above 2 prompts per batch: the batch size
    # halves (4 -> 2) and every prompt is still decoded once, in order.
    tokenizer = load_tokenizer(str(tiny_models["long"]))
    model = load_model(str(tiny_models["long"]), torch.device("cpu"), torch.float32)
    settings = GenerationSettings(max_new_tokens=6, batch_size=4)
    prompts = [format_prompt(tokenizer, q, settings) for q in ("1+2", "3+4", "5+6", "7+8", "9+1")]
    expected = generate_greedy(model, tokenizer, prompts, settings)
    real_batch = generation._generate_batch
    sizes = []

    def small_device(model, tokenizer, batch, *rest):
        sizes.append(len(batch))
        if len(batch) > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_batch(model, tokenizer, batch, *rest)

    monkeypatch.setattr(generation, "_generate_batch", small_device)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    assert [g.token_ids for g in generate_greedy(model, tokenizer, prompts, settings)] == [g.token_ids for g in expected]
    assert sizes == [4, 2, 2, 1]


def test_out_of_memory_at_batch_one(tiny_models, monkeypatch):
    tokenizer = load_tokenizer(str(tiny_models["long"]))
    model = load_model(str(tiny_models["long"]), torch.device("cpu"), torch.float32)

    def no_memory(*args):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(generation, "_generate_batch", no_memory)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        generate_greedy(model, tokenizer, ["1+2", "3+4"], GenerationSettings(batch_size=2))
