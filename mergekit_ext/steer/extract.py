"""Extraction of steering vectors from contrastive pairs."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch
from torch import nn

from mergekit_ext.errors import RecipeError
from mergekit_ext.steer.activations import collect_block_outputs
from mergekit_ext.steer.aggregate import aggregate_differences
from mergekit_ext.steer.data import ContrastivePair, hash_pairs
from mergekit_ext.steer.model_access import check_layers, decoder_blocks
from mergekit_ext.steer.template import PromptTemplate
from mergekit_ext.steer.vector import SteeringRecipe, SteeringVector

logger = logging.getLogger(__name__)


def encode_texts(tokenizer: object, template: PromptTemplate, texts: list[str]) -> list[list[int]]:
    """Tokenize each text as prefix + text + suffix."""
    return [template.token_ids(tokenizer, text) for text in texts]


def pair_activations(
    model: nn.Module,
    tokenizer: object,
    pairs: list[ContrastivePair],
    layers: list[int],
    template: PromptTemplate,
    position: str = "last",
    batch_size: int = 8,
    progress: Callable[[int], None] | None = None,
) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    """Return (positive, negative) block outputs as {layer: tensor(pairs, positions, hidden)}."""
    positive_ids = encode_texts(tokenizer, template, [pair.positive for pair in pairs])
    negative_ids = encode_texts(tokenizer, template, [pair.negative for pair in pairs])
    positive = collect_block_outputs(model, positive_ids, layers, position, batch_size, progress)
    negative = collect_block_outputs(model, negative_ids, layers, position, batch_size, progress)
    return positive, negative


def extract_steering_vector(
    model: nn.Module,
    tokenizer: object,
    pairs: list[ContrastivePair],
    layers: list[int],
    template: PromptTemplate | None = None,
    position: str = "last",
    method: str = "mean_difference",
    trim: float = 0.1,
    batch_size: int = 8,
    model_name: str = "",
    progress: Callable[[int], None] | None = None,
) -> SteeringVector:
    """Extract one direction per layer from pairs (positive minus negative, float32).

    A position rule that reads several positions (`index:-3,-1`) averages them.
    """
    if not pairs:
        raise RecipeError("no contrastive pairs given")
    template = template if template is not None else PromptTemplate()
    layers = check_layers(layers, len(decoder_blocks(model)))
    started = time.perf_counter()
    logger.info("extracting %s vectors at layers %s from %d pairs", method, layers, len(pairs))
    positive, negative = pair_activations(model, tokenizer, pairs, layers, template, position, batch_size, progress)
    directions = {
        layer: aggregate_differences(positive[layer].mean(dim=1), negative[layer].mean(dim=1), method, trim)
        for layer in layers
    }
    recipe = SteeringRecipe(
        model=model_name,
        position=position,
        method=method,
        template_prefix=template.prefix,
        template_suffix=template.suffix,
        template_hash=template.digest(tokenizer),
        dataset_hash=hash_pairs(pairs),
        num_pairs=len(pairs),
        trim=trim,
    )
    logger.info("extracted %d directions in %.1f s", len(directions), time.perf_counter() - started)
    return SteeringVector(directions=directions, recipe=recipe)


def rederive(model: nn.Module, tokenizer: object, vector: SteeringVector, pairs: list[ContrastivePair], batch_size: int = 8) -> SteeringVector:
    """Extract again with the recipe stored in `vector` (same template, position and method)."""
    recipe = vector.recipe
    template = PromptTemplate(prefix=recipe.template_prefix, suffix=recipe.template_suffix)
    return extract_steering_vector(
        model, tokenizer, pairs, vector.layers, template, recipe.position, recipe.method, recipe.trim, batch_size, recipe.model
    )
