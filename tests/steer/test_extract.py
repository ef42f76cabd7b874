"""Extraction: agreement with the steering-vectors library, methods, bad input."""

from __future__ import annotations

import json

import pytest
import torch

from mergekit_ext.errors import RecipeError
from mergekit_ext.steer.activations import collect_block_outputs
from mergekit_ext.steer.aggregate import aggregate_differences
from mergekit_ext.steer.data import ContrastivePair, load_pairs
from mergekit_ext.steer.extract import encode_texts, extract_steering_vector
from mergekit_ext.steer.template import PromptTemplate


def test_mean_difference_matches_steering_vectors(model, tokenizer, pairs):
    steering_vectors = pytest.importorskip("steering_vectors")
    from steering_vectors.aggregators import mean_aggregator

    template = PromptTemplate.from_chat_template(tokenizer)
    samples = [(template.prefix + pair.positive + template.suffix, template.prefix + pair.negative + template.suffix) for pair in pairs]
    reference = steering_vectors.train_steering_vector(
        model, tokenizer, samples, layers=[1, 3], read_token_index=-1, aggregator=mean_aggregator(), show_progress=False
    )
    ours = extract_steering_vector(model, tokenizer, pairs, [1, 3], template, batch_size=3)
    for layer in (1, 3):
        expected = reference.layer_activations[layer]
        assert expected.norm() > 0.1
        assert torch.allclose(ours.directions[layer], expected, atol=1e-5, rtol=0)


def test_layer_convention_is_hidden_states_offset(model, tokenizer):
    ids = encode_texts(tokenizer, PromptTemplate(), ["a short text"])
    recorded = collect_block_outputs(model, ids, [0, 2], "last")
    with torch.no_grad():
        states = model(torch.tensor(ids), output_hidden_states=True).hidden_states
    for layer in (0, 2):
        assert torch.allclose(recorded[layer][0, 0], states[layer + 1][0, -1], atol=1e-6)


def test_batched_equals_unbatched(model, tokenizer, pairs):
    template = PromptTemplate.from_chat_template(tokenizer)
    one = extract_steering_vector(model, tokenizer, pairs, [2], template, batch_size=1)
    many = extract_steering_vector(model, tokenizer, pairs, [2], template, batch_size=8)
    assert torch.allclose(one.directions[2], many.directions[2], atol=1e-6)


def test_position_rules(model, tokenizer):
    ids = encode_texts(tokenizer, PromptTemplate(), ["abcdef", "xyz"])
    full = collect_block_outputs(model, ids, [1], "index:-3,-1")[1]
    mean = collect_block_outputs(model, ids, [1], "mean")[1]
    with torch.no_grad():
        states = [model(torch.tensor([sequence]), output_hidden_states=True).hidden_states[2][0] for sequence in ids]
    assert torch.allclose(full[0, 0], states[0][-3], atol=1e-6)
    assert torch.allclose(full[1, 1], states[1][-1], atol=1e-6)
    assert torch.allclose(mean[1, 0], states[1].mean(dim=0), atol=1e-6)


def test_aggregation_methods():
    generator = torch.Generator().manual_seed(0)
    negative = torch.randn(9, 5, generator=generator)
    shift = torch.tensor([3.0, 0.0, 0.0, 0.0, 0.0])
    positive = negative + shift + 0.01 * torch.randn(9, 5, generator=generator)
    differences = positive - negative
    assert torch.allclose(aggregate_differences(positive, negative, "mean_difference"), differences.mean(0), atol=1e-6)
    assert torch.allclose(aggregate_differences(positive, negative, "median"), differences.median(0).values)
    trimmed = differences.sort(0).values[1:8].mean(0)
    assert torch.allclose(aggregate_differences(positive, negative, "trimmed_mean", trim=0.15), trimmed, atol=1e-6)
    pca = aggregate_differences(positive, negative, "pca")
    assert pca[0] > 2.9
    # Swapping the roles must flip the PCA sign through the majority rule.
    assert aggregate_differences(negative, positive, "pca")[0] < -2.9


def test_layer_out_of_range(model, tokenizer, pairs):
    with pytest.raises(RecipeError, match="layer 4 is out of range"):
        extract_steering_vector(model, tokenizer, pairs, [4])


def test_pairs_file_errors(tmp_path):
    cases = {
        "empty_line.jsonl": '{"positive": "a", "negative": "b"}\n\n',
        "empty_field.jsonl": '{"positive": "", "negative": "b"}\n',
        "missing_field.jsonl": '{"prompt": "a"}\n',
        "wrong_keys.jsonl": '{"text": "a"}\n',
        "identical.jsonl": '{"positive": "same", "negative": "same"}\n',
        "not_json.jsonl": "positive,negative\n",
        "empty.jsonl": "",
    }
    for name, content in cases.items():
        path = tmp_path / name
        path.write_text(content)
        with pytest.raises(RecipeError):
            load_pairs(path)


def test_pairs_file_formats(tmp_path):
    path = tmp_path / "pairs.jsonl"
    rows = [{"prompt": "Body. Respond in French.", "prompt_without_instruction": "Body"}, {"positive": "x y", "negative": "x"}]
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    assert load_pairs(path) == [ContrastivePair("Body. Respond in French.", "Body"), ContrastivePair("x y", "x")]
