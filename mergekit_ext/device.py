"""Resolution of the `--device` option shared by every command that computes."""

from __future__ import annotations

import re

import torch

from mergekit_ext.errors import RecipeError

DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """Turn `auto`, `cpu`, `cuda` or `cuda:N` into a torch device; `auto` takes CUDA when present."""
    if isinstance(spec, torch.device):
        return spec
    spec = (spec or "auto").strip().lower()
    if not DEVICE_PATTERN.match(spec):
        raise RecipeError(f"invalid device {spec!r}; use auto, cpu, cuda or cuda:N")
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RecipeError(f"device {spec!r} requested but CUDA is not available; use --device cpu")
        device = torch.device(spec)
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise RecipeError(
                f"device {spec!r} does not exist: {torch.cuda.device_count()} CUDA devices are visible"
            )
        return device
    return torch.device("cpu")
