"""Cosine heads, the unknown-task rule and evaluation of a tiny model end to end."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import BertConfig, BertModel

from mergekit_ext.models.encoder import load_encoder, locate_minilm, mean_pool
from mergekit_ext.models.heads import CosineHead
from mergekit_ext.zoo.evaluate import _predict, evaluate_model, evaluate_text_zoo
from mergekit_ext.zoo.text_tasks import Example, write_jsonl


def test_head_logits_are_scaled_cosines() -> None:
    prototypes = torch.tensor([[3.0, 0.0], [1.0, 1.0]])
    head = CosineHead(prototypes, ["a", "b"], logit_scale=100.0)
    embedding = F.normalize(torch.tensor([[1.0, 2.0]]), dim=-1)
    logits = head(embedding)
    expected_a = 100.0 * 1.0 / math.sqrt(5.0)
    expected_b = 100.0 * 3.0 / (math.sqrt(5.0) * math.sqrt(2.0))
    assert logits[0, 0].item() == pytest.approx(expected_a, rel=1e-5)
    assert logits[0, 1].item() == pytest.approx(expected_b, rel=1e-5)


def test_head_save_load_roundtrip(tmp_path: Path) -> None:
    head = CosineHead(torch.randn(3, 8), ["x", "y", "z"], logit_scale=50.0, task="demo")
    head.save(tmp_path / "head.safetensors")
    loaded = CosineHead.load(tmp_path / "head.safetensors")
    assert loaded.labels == ["x", "y", "z"]
    assert loaded.logit_scale == 50.0
    assert loaded.task == "demo"
    embeddings = F.normalize(torch.randn(5, 8), dim=-1)
    torch.testing.assert_close(loaded(embeddings), head(embeddings))


def test_head_class_means() -> None:
    embeddings = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    head = CosineHead.from_class_means(embeddings, torch.tensor([0, 1, 1]), ["a", "b"])
    torch.testing.assert_close(head.prototypes.detach(), torch.eye(2))


def test_mean_pool_ignores_padding() -> None:
    hidden = torch.tensor([[[1.0, 1.0], [3.0, 5.0], [100.0, 100.0]]])
    mask = torch.tensor([[1, 1, 0]])
    torch.testing.assert_close(mean_pool(hidden, mask), torch.tensor([[2.0, 3.0]]))


def test_unknown_task_rule_largest_max_logit() -> None:
    logits = {
        "first": torch.tensor([[9.0, 1.0], [2.0, 3.0]]),
        "second": torch.tensor([[5.0, 8.0, 0.0], [float("-inf"), 7.0, 1.0]]),
    }
    chosen, predicted = _predict(logits, ["first", "second"])
    assert chosen == ["first", "second"]
    assert predicted.tolist() == [0, 1]


class FixedModel:
    """Returns logits that are right for `first` and pick the wrong head for `second` texts."""

    def task_logits(self, texts: Sequence[str], tasks: Sequence[str]) -> dict[str, torch.Tensor]:
        out = {}
        for task in tasks:
            rows = []
            for text in texts:
                label = int(text[-1])
                row = torch.zeros(2)
                row[label] = 10.0 if task == "first" else 5.0
                rows.append(row)
            out[task] = torch.stack(rows)
        return out


def write_manifest(zoo: Path, tasks: dict[str, list[Example]], references: dict[str, float]) -> None:
    entries = {}
    for task, test in tasks.items():
        (zoo / task).mkdir(parents=True)
        write_jsonl(zoo / task / "test.jsonl", test)
        entries[task] = {
            "labels": ["0", "1"],
            "test": f"{task}/test.jsonl",
            "head": f"{task}/head.safetensors",
            "max_length": 16,
            "finetuned_accuracy": references[task],
        }
    (zoo / "zoo.json").write_text(json.dumps({"zoo": "text", "tasks": entries}), encoding="utf-8")


def test_evaluate_model_known_and_unknown(tmp_path: Path) -> None:
    tests = {
        "first": [Example(f"f{i} {i % 2}", str(i % 2)) for i in range(4)],
        "second": [Example(f"s{i} {i % 2}", str(i % 2)) for i in range(4)],
    }
    write_manifest(tmp_path, tests, {"first": 1.0, "second": 0.8})
    known = evaluate_model(FixedModel(), tmp_path)
    assert [item.accuracy for item in known.tasks] == [1.0, 1.0]
    assert known.tasks[1].normalized_accuracy == pytest.approx(1.25)
    unknown = evaluate_model(FixedModel(), tmp_path, unknown_task=True)
    # every text goes to the head of `first` (max logit 10 > 5), so `second` scores 0
    assert [item.accuracy for item in unknown.tasks] == [1.0, 0.0]
    assert unknown.tasks[1].task_choice_accuracy == 0.0
    assert unknown.average_accuracy == 0.5
    assert json.loads(json.dumps(unknown.to_dict()))["average_normalized_accuracy"] == pytest.approx(0.5)


def test_tiny_encoder_end_to_end(tmp_path: Path) -> None:
    """A random 2-layer BERT with one prototype per test text scores every text right."""
    torch.manual_seed(0)
    tokenizer_source = load_encoder(locate_minilm()).tokenizer
    config = BertConfig(
        vocab_size=tokenizer_source.vocab_size, hidden_size=32, num_hidden_layers=2,
        num_attention_heads=2, intermediate_size=64, max_position_embeddings=64,
    )  # fmt: skip
    model_dir = tmp_path / "tiny"
    BertModel(config).save_pretrained(model_dir)
    tokenizer_source.save_pretrained(model_dir)

    texts = ["a red apple", "the stock market fell", "quantum physics lecture"]
    test = [Example(text, str(index)) for index, text in enumerate(texts)]
    zoo = tmp_path / "zoo"
    write_manifest(zoo, {"tiny": test}, {"tiny": 1.0})
    manifest = json.loads((zoo / "zoo.json").read_text())
    manifest["tasks"]["tiny"]["labels"] = ["0", "1", "2"]
    (zoo / "zoo.json").write_text(json.dumps(manifest))

    encoder = load_encoder(model_dir)
    from mergekit_ext.models.encoder import embed_texts

    prototypes = embed_texts(encoder, texts, max_length=16)
    CosineHead(prototypes, ["0", "1", "2"], task="tiny").save(zoo / "tiny" / "head.safetensors")
    result = evaluate_text_zoo(model_dir, zoo)
    assert result.tasks[0].test_size == 3
    assert result.tasks[0].accuracy == 1.0

    # a head with the prototypes in the wrong order scores 0 of 3
    CosineHead(prototypes[[1, 2, 0]], ["0", "1", "2"], task="tiny").save(zoo / "tiny" / "head.safetensors")
    assert evaluate_text_zoo(model_dir, zoo).tasks[0].accuracy == 0.0
