"""Copying of the non-weight files of a checkpoint: config, generation config, tokenizer."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from mergekit_ext.checkpoint.writer import StreamingWriter
from mergekit_ext.errors import CheckpointError

logger = logging.getLogger(__name__)

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "chat_template.jinja",
    "chat_template.json",
)
GENERATION_CONFIG = "generation_config.json"

DTYPE_NAMES: dict[torch.dtype, str] = {
    torch.float32: "float32",
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
    torch.float64: "float64",
}


def parse_dtype(name: str | None) -> torch.dtype | None:
    """Map `float32`/`fp32`/`bfloat16`/`bf16`/`float16`/`fp16` to a torch dtype (None stays None)."""
    if name is None:
        return None
    aliases = {
        "float32": torch.float32,
        "fp32": torch.float32,
        "float16": torch.float16,
        "fp16": torch.float16,
        "half": torch.float16,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
        "float64": torch.float64,
    }
    try:
        return aliases[name.lower()]
    except KeyError:
        raise CheckpointError(f"unsupported dtype {name!r}; use one of float32, bfloat16, float16") from None


def copy_config(writer: StreamingWriter, source_folder: Path, dtype: torch.dtype | None) -> bool:
    """Copy `config.json` with its dtype fields set to `dtype`; return False when absent."""
    config_path = source_folder / "config.json"
    if not config_path.exists():
        return False
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{config_path}: invalid JSON ({error})") from error
    if dtype in DTYPE_NAMES:
        # transformers 4 reads "torch_dtype"; transformers 5 writes "dtype". Keep both in step.
        for key in ("torch_dtype", "dtype"):
            if key in config or key == "torch_dtype":
                config[key] = DTYPE_NAMES[dtype]
    writer.write_text("config.json", json.dumps(config, indent=2, sort_keys=True) + "\n")
    if (source_folder / GENERATION_CONFIG).exists():
        writer.copy_file(source_folder / GENERATION_CONFIG)
    return True


def copy_tokenizer(writer: StreamingWriter, source_folder: Path) -> list[str]:
    """Copy the tokenizer files found in `source_folder`; return their names."""
    copied = []
    for name in TOKENIZER_FILES:
        if (source_folder / name).exists():
            writer.copy_file(source_folder / name)
            copied.append(name)
    if not copied:
        logger.warning("No tokenizer files found in %s; the output has no tokenizer", source_folder)
    return copied
