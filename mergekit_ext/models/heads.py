"""Cosine classification heads over L2-normalized sentence embeddings.

A head has one prototype vector per class. Its logits are
`logit_scale * cos(embedding, prototype)`, the form of CLIP zero-shot heads. The
scale is fixed and equal for every head, so logits of different tasks' heads are
on one scale and can be compared when the task of an input is unknown.

The default scale is 100, the value CLIP's learned temperature reaches (and is
clamped to) in "Learning Transferable Visual Models From Natural Language
Supervision" (Radford et al., 2021). At that scale a cosine gap of 0.05 is a logit
gap of 5, so the softmax can become confident although cosines of one encoder lie
close together.

File format: one safetensors file with the tensor `prototypes` ([classes, dim],
float32, rows L2-normalized when saved) and metadata `labels` (JSON list of class
names, row order), `logit_scale` and `task`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from mergekit_ext.errors import CheckpointError

DEFAULT_LOGIT_SCALE = 100.0


class CosineHead(torch.nn.Module):
    """Class prototypes scored by scaled cosine similarity."""

    def __init__(
        self,
        prototypes: torch.Tensor,
        labels: Sequence[str],
        logit_scale: float = DEFAULT_LOGIT_SCALE,
        task: str = "",
    ) -> None:
        super().__init__()
        if prototypes.ndim != 2 or prototypes.shape[0] != len(labels):
            raise ValueError(
                f"prototypes of shape {tuple(prototypes.shape)} do not match {len(labels)} labels"
            )
        self.prototypes = torch.nn.Parameter(prototypes.detach().clone().float())
        self.labels = list(labels)
        self.logit_scale = float(logit_scale)
        self.task = task

    @classmethod
    def from_class_means(
        cls,
        embeddings: torch.Tensor,
        label_ids: torch.Tensor,
        labels: Sequence[str],
        logit_scale: float = DEFAULT_LOGIT_SCALE,
        task: str = "",
    ) -> CosineHead:
        """Start each prototype at the normalized mean embedding of its class (nearest class mean)."""
        dim = embeddings.shape[1]
        sums = torch.zeros(len(labels), dim).index_add_(0, label_ids, embeddings.float())
        # a class absent from `embeddings` keeps a zero prototype, which F.normalize leaves at zero
        return cls(F.normalize(sums, dim=-1), labels, logit_scale, task)

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Return logits [batch, classes] for L2-normalized embeddings [batch, dim]."""
        prototypes = F.normalize(self.prototypes, dim=-1).to(embeddings.device, embeddings.dtype)
        return self.logit_scale * embeddings @ prototypes.T

    def save(self, path: str | Path) -> None:
        """Write the head as safetensors with labels, scale and task name in the metadata."""
        metadata = {
            "labels": json.dumps(self.labels),
            "logit_scale": repr(self.logit_scale),
            "task": self.task,
        }
        prototypes = F.normalize(self.prototypes.detach().float().cpu(), dim=-1).contiguous()
        save_file({"prototypes": prototypes}, str(path), metadata=metadata)

    @classmethod
    def load(cls, path: str | Path) -> CosineHead:
        """Read a head written by `save`."""
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"Head file {path} not found. Build the zoo again: merge zoo build text")
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            if "prototypes" not in handle.keys() or "labels" not in metadata:
                raise CheckpointError(
                    f"{path} is not a cosine head file: it needs the tensor 'prototypes' and "
                    "the metadata key 'labels'. Build the zoo again: merge zoo build text"
                )
            prototypes = handle.get_tensor("prototypes")
        return cls(
            prototypes,
            json.loads(metadata["labels"]),
            float(metadata.get("logit_scale", DEFAULT_LOGIT_SCALE)),
            metadata.get("task", ""),
        )
