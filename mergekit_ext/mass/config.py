"""The `mass_config.json` file of a MASS artifact and the folder layout around it.

Layout of an artifact folder:

- the shared model θ_MT = θ_base + TSV-M(all tasks) in the Hugging Face layout
  (`model.safetensors` or shards, `config.json`, tokenizer files; `open_clip_config.json`
  for open_clip models), loadable by transformers or open_clip as it is;
- `mass/task_NN.safetensors`, one file per task: for a 2-D tensor `W` the factors
  `W.u` (m × k), `W.s` (k) and `W.vh` (k × n) of the task's truncated SVD, for any other
  changed tensor the whole task vector `W.delta`;
- `mass/heads/task_NN.safetensors`: the task's cosine head, when the tasks have heads;
- `mass_config.json`: this model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from mergekit_ext.errors import CheckpointError, RecipeError

FORMAT_VERSION = 1
CONFIG_NAME = "mass_config.json"
FACTORS_FOLDER = "mass"
HEADS_FOLDER = "mass/heads"

ModelKind = Literal["hf-encoder", "hf-clip-vision", "open-clip", "causal-lm"]
# cls: the first token. mean: the mean over non-padding tokens. content: the mean over
# tokens that are neither padding nor marker tokens ([CLS], [SEP], BOS, EOS).
TokenRule = Literal["cls", "mean", "content"]
TOKEN_RULES: tuple[TokenRule, ...] = ("cls", "mean", "content")
TEXT_KINDS: tuple[str, ...] = ("hf-encoder", "causal-lm")


def check_token_rule(rule: str, kind: str) -> None:
    """Raise unless `rule` is a token rule that models of `kind` support (content needs a tokenizer)."""
    if rule not in TOKEN_RULES:
        raise RecipeError(f"token rule {rule!r} is invalid; use one of {', '.join(TOKEN_RULES)}")
    if rule == "content" and kind not in TEXT_KINDS:
        raise RecipeError(f"token rule 'content' needs a text model, and this one is {kind}; use cls or mean")


def factor_file(task_index: int) -> str:
    """Return the path of a task's factor file inside the artifact."""
    return f"{FACTORS_FOLDER}/task_{task_index:02d}.safetensors"


def head_file(task_index: int) -> str:
    """Return the path of a task's head file inside the artifact."""
    return f"{HEADS_FOLDER}/task_{task_index:02d}.safetensors"


class RouterConfig(BaseModel):
    """Router defaults stored with the artifact; `MassModel.from_pretrained` can override them."""

    model_config = ConfigDict(extra="forbid")

    layer: int = Field(description="Block index ℓ whose first MLP linear input is hooked.")
    site: str = Field(description="Module name of that linear in the loaded model.")
    weight: str = Field(description="Checkpoint tensor name of that linear's weight.")
    token_rule: TokenRule
    threshold: float = 0.2
    top_k: int = 3
    temperature: float = 1.0
    mode: Literal["topk", "top1"] = "topk"
    rank: int | None = Field(
        default=None,
        description="Top singular vectors per task that the router uses. None means all k, as in MASS.",
    )


class StorageReport(BaseModel):
    """Bytes of each part of the artifact and its size against one model."""

    model_config = ConfigDict(extra="forbid")

    shared_bytes: int
    factor_bytes: int
    head_bytes: int
    one_model_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.shared_bytes + self.factor_bytes + self.head_bytes

    @property
    def storage_factor(self) -> float:
        return self.total_bytes / self.one_model_bytes


class MassConfig(BaseModel):
    """Contents of `mass_config.json`."""

    model_config = ConfigDict(extra="forbid")

    format_version: int = FORMAT_VERSION
    model_kind: ModelKind
    task_names: list[str]
    rank: int | None = Field(default=None, description="Fixed per-task rank; None: the rank rule below.")
    rank_fraction: float | None = Field(
        default=None, description="Per-task rank ⌊fraction·min(m, n)⌋; None with rank None: ⌊min(m, n)/T⌋."
    )
    svd_method: Literal["full", "randomized"] = "full"
    seed: int = 0
    alpha: float = 1.0
    router: RouterConfig
    has_heads: bool = False
    # Inference default: keep θ_MT's output of blocks before the router block in pass 2.
    reuse_prefix: bool = False
    redundancy_epsilon: float | None = None
    # Tensors for which the redundancy filter left tasks out of the shared model: name -> kept task indices.
    shared_task_subsets: dict[str, list[int]] = Field(default_factory=dict)
    storage: StorageReport
    tool_version: str = ""

    def save(self, folder: Path) -> None:
        (folder / CONFIG_NAME).write_text(self.model_dump_json(indent=2) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, folder: Path) -> MassConfig:
        path = folder / CONFIG_NAME
        if not path.is_file():
            raise CheckpointError(
                f"{folder} is not a MASS artifact: {CONFIG_NAME} is missing. Build one with: merge mass"
            )
        try:
            config = cls.model_validate(json.loads(path.read_text(encoding="utf-8")))
        except (json.JSONDecodeError, ValidationError) as error:
            raise CheckpointError(f"{path} is invalid ({error}); rebuild the artifact with: merge mass") from error
        if config.format_version != FORMAT_VERSION:
            raise CheckpointError(
                f"{path} has format version {config.format_version}; this mergekit-ext reads version "
                f"{FORMAT_VERSION}. Rebuild the artifact with: merge mass"
            )
        return config
