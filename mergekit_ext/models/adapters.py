"""Forward-pass adapters: one interface over transformers encoders, CLIP image towers and LMs.

An adapter is a `torch.nn.Module` that owns the loaded model as its submodule `model`.
It turns raw inputs (texts, preprocessed images, prompts) into a `ModelBatch`, and its
`forward` returns L2-normalized features that cosine heads read. Because the adapter is
a module, `torch.func.functional_call(adapter, parameters, (batch,))` runs it with any
set of replacement weights (`model.<tensor name>`) without copying the model.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from mergekit_ext.errors import CheckpointError
from mergekit_ext.mass.config import ModelKind, TokenRule
from mergekit_ext.models.encoder import mean_pool

logger = logging.getLogger(__name__)

OPEN_CLIP_CONFIG = "open_clip_config.json"
OPEN_CLIP_WEIGHTS = ("open_clip_model.safetensors", "model.safetensors")


@dataclass
class ModelBatch:
    """Model keyword inputs for one batch, and the token masks the router's token rules average over.

    `token_mask` marks non-padding tokens, for the `mean` rule. `content_mask` marks
    the tokens that are neither padding nor markers such as [CLS] and [SEP], for the
    `content` rule.
    """

    inputs: dict[str, torch.Tensor]
    token_mask: torch.Tensor | None
    size: int
    content_mask: torch.Tensor | None = None

    def select(self, rows: torch.Tensor) -> ModelBatch:
        """Return the sub-batch of the given row indices (padding length unchanged)."""
        inputs = {key: value[rows] for key, value in self.inputs.items()}
        mask = None if self.token_mask is None else self.token_mask[rows]
        content = None if self.content_mask is None else self.content_mask[rows]
        return ModelBatch(inputs=inputs, token_mask=mask, size=int(rows.numel()), content_mask=content)


def marker_token_ids(tokenizer: Any) -> list[int]:
    """Return the ids of the tokens that frame a text ([CLS], [SEP], BOS, EOS, padding).

    Unknown-word tokens are not among them: they stand for a word of the text.
    """
    names = ("cls_token_id", "sep_token_id", "bos_token_id", "eos_token_id", "pad_token_id")
    return sorted({value for value in (getattr(tokenizer, name, None) for name in names) if value is not None})


def text_batch(tokenizer: Any, encoded: Any, device: torch.device, size: int) -> ModelBatch:
    """Build the batch of tokenized texts, with the mask of content tokens (not padding, not a marker)."""
    inputs = {"input_ids": encoded["input_ids"].to(device), "attention_mask": encoded["attention_mask"].to(device)}
    markers = torch.tensor(marker_token_ids(tokenizer), dtype=inputs["input_ids"].dtype, device=device)
    content = inputs["attention_mask"].bool() & ~torch.isin(inputs["input_ids"], markers)
    return ModelBatch(inputs=inputs, token_mask=inputs["attention_mask"], size=size, content_mask=content)


class ForwardAdapter(torch.nn.Module):
    """Base class: `prepare` raw inputs, `forward` to normalized features, pick router tokens."""

    kind: ModelKind
    token_rule: TokenRule = "mean"
    # Batch dimension of the hidden states that flow between blocks.
    hidden_batch_dim: int = 0

    def __init__(self, model: torch.nn.Module, device: torch.device) -> None:
        super().__init__()
        self.model = model
        self.device = device

    def prepare(self, raw: Any) -> ModelBatch:
        raise NotImplementedError

    def select_rows(self, batch: ModelBatch, rows: torch.Tensor, keep_length: bool) -> ModelBatch:
        """Return a sub-batch; adapters may drop padding the sub-batch does not need unless `keep_length`."""
        return batch.select(rows)

    def forward(self, batch: ModelBatch) -> torch.Tensor:  # type: ignore[override]
        raise NotImplementedError

    def router_tokens(self, hooked_input: torch.Tensor, batch: ModelBatch) -> torch.Tensor:
        """Reduce the router site's input (batch × tokens × width in any layout) to batch × width."""
        states = hooked_input.transpose(0, 1) if self.hidden_batch_dim == 1 else hooked_input
        if states.ndim == 2:
            return states.float()
        if self.token_rule == "cls":
            return states[:, 0].float()
        mask = batch.token_mask
        if self.token_rule == "content" and batch.content_mask is not None:
            # A text made only of special tokens (an empty string) falls back to them.
            empty = ~batch.content_mask.any(dim=1, keepdim=True)
            mask = batch.content_mask | (empty & batch.token_mask.bool()) if batch.token_mask is not None else batch.content_mask
        if mask is None:
            return states.float().mean(dim=1)
        return mean_pool(states.float(), mask.to(states.device))


class TextEncoderAdapter(ForwardAdapter):
    """A transformers encoder (BERT family): mean pooling over non-padding tokens, L2-normalized."""

    kind: ModelKind = "hf-encoder"
    token_rule: TokenRule = "mean"

    def __init__(self, model: torch.nn.Module, tokenizer: Any, device: torch.device, max_length: int = 128) -> None:
        super().__init__(model, device)
        self.tokenizer = tokenizer
        self.max_length = max_length

    def prepare(self, raw: Sequence[str]) -> ModelBatch:
        encoded = self.tokenizer(
            list(raw), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        return text_batch(self.tokenizer, encoded, self.device, len(raw))

    def select_rows(self, batch: ModelBatch, rows: torch.Tensor, keep_length: bool) -> ModelBatch:
        """Return a sub-batch, cut to its longest text unless `keep_length` (the tokenizer pads on the right)."""
        selected = batch.select(rows)
        if keep_length or self.tokenizer.padding_side != "right":
            return selected
        length = max(int(selected.inputs["attention_mask"].sum(dim=1).max()), 1)
        inputs = {key: value[:, :length] for key, value in selected.inputs.items()}
        content = None if selected.content_mask is None else selected.content_mask[:, :length]
        return ModelBatch(inputs=inputs, token_mask=inputs["attention_mask"], size=selected.size, content_mask=content)

    def forward(self, batch: ModelBatch) -> torch.Tensor:  # type: ignore[override]
        output = self.model(**batch.inputs)
        pooled = mean_pool(output.last_hidden_state, batch.inputs["attention_mask"])
        return F.normalize(pooled.float(), dim=-1)


class ClipVisionAdapter(ForwardAdapter):
    """Hugging Face CLIP image tower: projected image embedding (or pooled output), CLS routing."""

    kind: ModelKind = "hf-clip-vision"
    token_rule: TokenRule = "cls"

    def prepare(self, raw: torch.Tensor) -> ModelBatch:
        pixels = raw.to(self.device)
        return ModelBatch(inputs={"pixel_values": pixels}, token_mask=None, size=int(pixels.shape[0]))

    def forward(self, batch: ModelBatch) -> torch.Tensor:  # type: ignore[override]
        output = self.model(**batch.inputs)
        features = getattr(output, "image_embeds", None)
        if features is None:
            features = output.pooler_output
        return F.normalize(features.float(), dim=-1)


class OpenClipAdapter(ForwardAdapter):
    """open_clip model: `encode_image`, CLS routing; handles batch-first and sequence-first towers."""

    kind: ModelKind = "open-clip"
    token_rule: TokenRule = "cls"

    @property  # type: ignore[override]
    def hidden_batch_dim(self) -> int:
        # open_clip before 2.23 ran its towers sequence-first (tokens × batch × width) and
        # had no `batch_first` attribute.
        return 0 if getattr(self.model.visual.transformer, "batch_first", False) else 1

    def prepare(self, raw: torch.Tensor) -> ModelBatch:
        pixels = raw.to(self.device)
        return ModelBatch(inputs={"image": pixels}, token_mask=None, size=int(pixels.shape[0]))

    def forward(self, batch: ModelBatch) -> torch.Tensor:  # type: ignore[override]
        return F.normalize(self.model.encode_image(batch.inputs["image"]).float(), dim=-1)


class CausalLmAdapter(ForwardAdapter):
    """A transformers causal LM: routing on the mean of prompt tokens; `forward` returns next-token logits."""

    kind: ModelKind = "causal-lm"
    token_rule: TokenRule = "mean"

    def __init__(self, model: torch.nn.Module, tokenizer: Any, device: torch.device) -> None:
        super().__init__(model, device)
        self.tokenizer = tokenizer
        # Left padding keeps every prompt's last token at the end, as generation needs.
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token

    def prepare(self, raw: Sequence[str]) -> ModelBatch:
        encoded = self.tokenizer(list(raw), padding=True, return_tensors="pt")
        return text_batch(self.tokenizer, encoded, self.device, len(raw))

    def forward(self, batch: ModelBatch, generate_kwargs: dict[str, Any] | None = None) -> torch.Tensor:  # type: ignore[override]
        if generate_kwargs is not None:
            return self.model.generate(**batch.inputs, **generate_kwargs)
        return self.model(**batch.inputs).logits[:, -1].float()


def load_adapter(folder: Path, kind: ModelKind, device: torch.device) -> ForwardAdapter:
    """Load the model in `folder` (offline) and wrap it in the adapter for `kind`, in eval mode."""
    if kind == "open-clip":
        adapter: ForwardAdapter = OpenClipAdapter(_load_open_clip(folder), device)
    else:
        from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

        if kind == "hf-clip-vision":
            adapter = ClipVisionAdapter(_load_clip_vision(folder), device)
        elif kind == "causal-lm":
            model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
            adapter = CausalLmAdapter(model, AutoTokenizer.from_pretrained(folder, local_files_only=True), device)
        else:
            model = AutoModel.from_pretrained(folder, local_files_only=True)
            adapter = TextEncoderAdapter(model, AutoTokenizer.from_pretrained(folder, local_files_only=True), device)
    adapter.to(device)
    adapter.eval()
    return adapter


def _load_clip_vision(folder: Path) -> torch.nn.Module:
    from safetensors import safe_open
    from transformers import CLIPVisionModel, CLIPVisionModelWithProjection

    has_projection = False
    for file in folder.glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as handle:
            has_projection = has_projection or "visual_projection.weight" in handle.keys()
    model_class = CLIPVisionModelWithProjection if has_projection else CLIPVisionModel
    return model_class.from_pretrained(folder, local_files_only=True)


def _load_open_clip(folder: Path) -> torch.nn.Module:
    try:
        import open_clip
    except ImportError as error:
        raise CheckpointError(
            f"{folder} contains an open_clip model but open_clip is not installed; install the clip extra: "
            "pip install 'mergekit-ext[clip]'"
        ) from error
    from safetensors.torch import load_file

    config = json.loads((folder / OPEN_CLIP_CONFIG).read_text())
    model_config = config.get("model_cfg", config)
    model = open_clip.CLIP(**model_config)
    weights = next((folder / name for name in OPEN_CLIP_WEIGHTS if (folder / name).is_file()), None)
    if weights is None:
        raise CheckpointError(f"{folder} has {OPEN_CLIP_CONFIG} but no weights ({' or '.join(OPEN_CLIP_WEIGHTS)})")
    model.load_state_dict(load_file(str(weights)))
    return model


def parameter_names(adapter: ForwardAdapter, tensor_names: Sequence[str]) -> dict[str, str]:
    """Map checkpoint tensor names to the adapter's parameter and buffer names (`model.…`).

    Tries the name as it is, then without its first component (a task-model prefix such
    as `bert.`), then with the model's `base_model_prefix`. Names without a match (a
    text tower the image adapter does not load, for example) are left out.
    """
    state_names = {name for name, _ in adapter.model.named_parameters()} | {name for name, _ in adapter.model.named_buffers()}
    prefix = getattr(adapter.model, "base_model_prefix", "")
    mapping: dict[str, str] = {}
    for name in tensor_names:
        for candidate in (name, name.split(".", 1)[-1], f"{prefix}.{name}" if prefix else name):
            if candidate in state_names:
                mapping[name] = f"model.{candidate}"
                break
    return mapping
