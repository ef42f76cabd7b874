"""Tiny random checkpoints for the MASS tests: a base and task models with low-rank task vectors."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from mergekit_ext.models.heads import CosineHead

WORDS = ["alpha", "beta", "gamma", "delta", "river", "stone", "cloud", "green", "seven", "quick", "brown", "fox"]


def write_tiny_bert(folder: Path, seed: int = 0, layers: int = 4) -> Path:
    """Write a random 4-block BERT (hidden 32) with a word-piece tokenizer to `folder`."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=5 + len(WORDS),
        hidden_size=32,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=32,
    )
    model = BertModel(config).eval()
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    BertTokenizerFast(vocab_file=str(vocab)).save_pretrained(folder)
    return folder


def perturb_checkpoint(
    source: Path,
    target: Path,
    seed: int,
    rank: int = 2,
    scale: float = 0.5,
    skip: Callable[[str], bool] = lambda name: False,
) -> Path:
    """Copy `source` to `target` adding a random rank-`rank` change to every 2-D tensor and noise to 1-D ones."""
    import shutil

    shutil.copytree(source, target)
    weights_file = target / "model.safetensors"
    tensors = load_file(str(weights_file))
    generator = torch.Generator().manual_seed(seed)
    for name, tensor in tensors.items():
        if not tensor.is_floating_point() or skip(name):
            continue
        if tensor.ndim == 2:
            left = torch.randn(tensor.shape[0], rank, generator=generator)
            right = torch.randn(rank, tensor.shape[1], generator=generator)
            change = left @ right / (tensor.shape[0] * tensor.shape[1]) ** 0.25
        else:
            change = torch.randn(tensor.shape, generator=generator)
        tensors[name] = tensor + scale * change * tensor.std().clamp_min(1e-3)
    save_file(tensors, str(weights_file), metadata={"format": "pt"})
    return target


def write_heads(folder: Path, num_tasks: int, dim: int, classes: int = 3, seed: int = 0) -> list[Path]:
    """Write one random cosine head per task; returns their paths."""
    generator = torch.Generator().manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for task in range(num_tasks):
        head = CosineHead(torch.randn(classes, dim, generator=generator), [f"c{i}" for i in range(classes)], task=f"t{task}")
        path = folder / f"head_{task}.safetensors"
        head.save(path)
        paths.append(path)
    return paths


def word_level_tokenizer() -> Any:
    """Return a whitespace word-level tokenizer over WORDS, with pad 0, eos 1 and unk 2."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocabulary = {token: index for index, token in enumerate(["<pad>", "<eos>", "<unk>", *WORDS])}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocabulary, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")


def write_tiny_llama(folder: Path, seed: int = 0) -> Path:
    """Write a random 2-block Llama causal LM (hidden 32) with a word-level tokenizer to `folder`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    wrapped = word_level_tokenizer()
    vocabulary = wrapped.get_vocab()
    config = LlamaConfig(
        vocab_size=len(vocabulary), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        eos_token_id=1, pad_token_id=0, bos_token_id=None, tie_word_embeddings=False,
    )  # fmt: skip
    folder.mkdir(parents=True, exist_ok=True)
    LlamaForCausalLM(config).eval().save_pretrained(folder)
    wrapped.save_pretrained(folder)
    return folder
