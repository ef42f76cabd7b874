"""Abliteration: a new checkpoint with the refusal direction folded out of the weights."""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mergekit_ext.checkpoint import CardInput, Checkpoint, ModelCard, PlannedTensor, StreamingWriter
from mergekit_ext.checkpoint.files import copy_config, copy_tokenizer
from mergekit_ext.errors import CheckpointError, RecipeError
from mergekit_ext.steer.ablation import orthogonalize_embedding, orthogonalize_output_bias, orthogonalize_output_weight

logger = logging.getLogger(__name__)

# Matrices that write into the residual stream, in Llama/Qwen2/Mistral naming.
_OUTPUT_PROJECTION = re.compile(r"(?:^|\.)layers\.(\d+)\.(?:self_attn\.o_proj|mlp\.down_proj)\.(weight|bias)$")
_EMBEDDING = re.compile(r"(?:^|\.)embed_tokens\.weight$")


@dataclass
class AbliterationResult:
    """Output folder and edited tensor names of one abliteration."""

    output: Path
    edited: list[str] = field(default_factory=list)
    tied_lm_head: bool = False


def _strength_for(layer: int, strength: float, layer_strengths: dict[int, float]) -> float:
    return layer_strengths.get(layer, strength)


def abliterate_checkpoint(
    model_folder: str | Path,
    output: str | Path,
    direction: torch.Tensor,
    strength: float = 1.0,
    layer_strengths: dict[int, float] | None = None,
    include_embeddings: bool = False,
    force: bool = False,
    progress: Callable[[int], None] | None = None,
) -> AbliterationResult:
    """Write `model_folder` to `output` with W <- W - s r̂ r̂ᵀ W on every o_proj and down_proj.

    `strength` s applies to every layer unless `layer_strengths` gives {layer: s}. With
    `include_embeddings`, the token embedding is edited too; when the checkpoint ties the
    lm_head to the embedding, that edits the output projection as well.
    """
    layer_strengths = layer_strengths or {}
    checkpoint = Checkpoint.open(model_folder)
    config = checkpoint.config or {}
    width = config.get("hidden_size")
    if width is not None and direction.shape != (width,):
        raise CheckpointError(f"the direction has shape {tuple(direction.shape)} but {model_folder} has hidden_size {width}")
    unknown = [layer for layer in layer_strengths if not 0 <= layer < config.get("num_hidden_layers", 10**9)]
    if unknown:
        raise RecipeError(f"layer strengths name layers {unknown} that the model does not have")
    if not any(_OUTPUT_PROJECTION.search(name) for name in checkpoint.names):
        raise CheckpointError(f"{model_folder} has no layers.N.self_attn.o_proj or layers.N.mlp.down_proj tensors to edit")

    result = AbliterationResult(output=Path(output))
    tied = bool(config.get("tie_word_embeddings", False)) and "lm_head.weight" not in checkpoint
    if include_embeddings and tied:
        result.tied_lm_head = True
        logger.warning("%s ties lm_head to the token embedding: editing the embedding changes the output logits too", model_folder)

    plan = [PlannedTensor(name, tuple(checkpoint.info(name).shape), checkpoint.info(name).dtype) for name in checkpoint.names]
    started = time.perf_counter()
    with StreamingWriter(output, plan, force=force, inputs=[Path(model_folder)]) as writer:
        for name in checkpoint.names:
            tensor = checkpoint.load(name)
            match = _OUTPUT_PROJECTION.search(name)
            if match:
                scale = _strength_for(int(match.group(1)), strength, layer_strengths)
                edit = orthogonalize_output_weight if match.group(2) == "weight" else orthogonalize_output_bias
                tensor = edit(tensor, direction, scale)
                result.edited.append(name)
            elif include_embeddings and _EMBEDDING.search(name):
                tensor = orthogonalize_embedding(tensor, direction, strength)
                result.edited.append(name)
            writer.write(name, tensor)
            if progress is not None:
                progress(1)
        copy_config(writer, Path(model_folder), None)
        copy_tokenizer(writer, Path(model_folder))
        recipe = {
            "method": "abliteration",
            "strength": strength,
            "layer_strengths": {str(layer): value for layer, value in sorted(layer_strengths.items())},
            "include_embeddings": include_embeddings,
            "tied_lm_head_edited": result.tied_lm_head,
            "direction_norm": float(direction.norm()),
            "edited_tensors": len(result.edited),
        }
        writer.write_text("abliteration.json", json.dumps(recipe, indent=2) + "\n")
        card = ModelCard(
            title=f"{Path(model_folder).name} (abliterated)",
            method="abliteration",
            inputs=[CardInput(name=Path(model_folder).name, sha256=checkpoint.sha256(), role="base")],
            parameters=recipe,
            extra_tags=["abliterated"],
        )
        writer.write_text("README.md", card.render())
        writer.commit()
    logger.info("abliterated %d tensors into %s in %.1f s", len(result.edited), output, time.perf_counter() - started)
    return result
