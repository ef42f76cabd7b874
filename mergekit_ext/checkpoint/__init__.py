"""Checkpoint I/O: lazy reader, streaming writer, config/tokenizer copies, model cards.

Names load on first use, so that importing the card module (as `merge push` does)
does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "CardInput": "mergekit_ext.checkpoint.card",
    "ModelCard": "mergekit_ext.checkpoint.card",
    "Checkpoint": "mergekit_ext.checkpoint.reader",
    "TensorInfo": "mergekit_ext.checkpoint.reader",
    "PlannedTensor": "mergekit_ext.checkpoint.writer",
    "StreamingWriter": "mergekit_ext.checkpoint.writer",
    "parse_size": "mergekit_ext.checkpoint.writer",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
