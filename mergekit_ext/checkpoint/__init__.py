"""Checkpoint I/O: lazy reader, streaming writer, config/tokenizer copies, model cards."""

from mergekit_ext.checkpoint.card import CardInput, ModelCard
from mergekit_ext.checkpoint.reader import Checkpoint, TensorInfo
from mergekit_ext.checkpoint.writer import PlannedTensor, StreamingWriter, parse_size

__all__ = [
    "CardInput",
    "Checkpoint",
    "ModelCard",
    "PlannedTensor",
    "StreamingWriter",
    "TensorInfo",
    "parse_size",
]
