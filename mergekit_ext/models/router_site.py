"""Discovery of transformer blocks and of the MASS router site inside a loaded model.

The router site of block ℓ is the first linear of the block's MLP: its input is the
block's normalized residual stream entering the MLP. Names by architecture:
`intermediate.dense` (BERT family), `mlp.fc1` (Hugging Face CLIP and ViT-like models),
`mlp.c_fc` (open_clip and GPT-2), `mlp.gate_proj` or `mlp.up_proj` (Llama, Qwen2,
Mistral: both read the same input), `mlp.dense_h_to_4h` (GPT-NeoX), `mlp.fc_in` (GPT-J).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch

from mergekit_ext.errors import CheckpointError

ROUTER_SITE_SUFFIXES = (
    "intermediate.dense",
    "mlp.fc1",
    "mlp.c_fc",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.dense_h_to_4h",
    "mlp.fc_in",
)
# Modules that hold the block list, most specific first. open_clip models hold a text
# tower (`transformer.resblocks`) beside the image tower, and the router uses the image tower.
BLOCK_LIST_PREFERENCES = ("visual.transformer.resblocks", "vision_model.encoder.layers")


def find_block_list(model: torch.nn.Module) -> tuple[str, torch.nn.ModuleList]:
    """Return the name and module of the model's list of transformer blocks.

    The list is the `ModuleList` whose items each contain a router-site linear; when
    several exist, a known image-tower list wins, then the longest list.
    """
    candidates: list[tuple[str, torch.nn.ModuleList]] = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) > 0:
            if all(_site_in_block(block) is not None for block in module):
                candidates.append((name, module))
    if not candidates:
        raise CheckpointError(
            f"no list of transformer blocks with an MLP linear found in {type(model).__name__}; "
            f"the router needs a block list whose blocks contain one of {', '.join(ROUTER_SITE_SUFFIXES)}"
        )
    for preferred in BLOCK_LIST_PREFERENCES:
        for name, module in candidates:
            if name.endswith(preferred):
                return name, module
    return max(candidates, key=lambda item: len(item[1]))


def _site_in_block(block: torch.nn.Module) -> str | None:
    names = {name for name, _ in block.named_modules()}
    for suffix in ROUTER_SITE_SUFFIXES:
        if suffix in names:
            return suffix
    return None


def default_router_layer(depth: int) -> int:
    """Return the default router block ⌊0.75·depth⌋ (9 for 12 blocks, 18 for 24, 4 for 6).

    MASS uses block 9 for ViT-B/32 and ViT-B/16 (12 blocks) and block 20 for ViT-L/14
    (24 blocks); pass the layer explicitly for ViT-L/14.
    """
    return int(0.75 * depth)


def find_router_site(model: torch.nn.Module, layer: int | None = None) -> tuple[str, int]:
    """Return (module name, block index) of the router site: the first MLP linear of block `layer`.

    `layer` None takes `default_router_layer`; negative values count from the end.
    Raises CheckpointError listing the linear modules of the block when none matches.
    """
    list_name, blocks = find_block_list(model)
    depth = len(blocks)
    index = default_router_layer(depth) if layer is None else layer
    if index < 0:
        index += depth
    if not 0 <= index < depth:
        raise CheckpointError(f"router layer {layer} is out of range: the model has {depth} blocks (0 to {depth - 1})")
    suffix = _site_in_block(blocks[index])
    if suffix is None:
        linears = [n for n, m in blocks[index].named_modules() if isinstance(m, torch.nn.Linear)]
        raise CheckpointError(
            f"no router site in block {index} ({list_name}.{index}); expected one of "
            f"{', '.join(ROUTER_SITE_SUFFIXES)}, found the linear modules {', '.join(linears) or 'none'}"
        )
    prefix = f"{list_name}.{index}" if list_name else str(index)
    return f"{prefix}.{suffix}", index


def find_router_weight_name(tensor_names: Iterable[str], layer: int | None, depth_hint: int | None = None) -> tuple[str, int]:
    """Return (tensor name, block index) of the router site's weight from checkpoint tensor names alone.

    Used when the artifact is built, before any model is instantiated. Blocks are
    recognized by a number before a router-site suffix; open_clip's image tower wins
    over its text tower.
    """
    names = list(tensor_names)
    pattern = re.compile(r"^(?P<prefix>.*?)(?P<index>\d+)\.(?P<suffix>" + "|".join(map(re.escape, ROUTER_SITE_SUFFIXES)) + r")\.weight$")
    by_prefix: dict[str, dict[int, str]] = {}
    for name in names:
        match = pattern.match(name)
        if match:
            by_prefix.setdefault(match["prefix"], {}).setdefault(int(match["index"]), name)
    if not by_prefix:
        raise CheckpointError(
            "no router site found among the checkpoint's tensors: expected a numbered block with "
            f"one of {', '.join(ROUTER_SITE_SUFFIXES)} (for example encoder.layer.4.intermediate.dense.weight)"
        )
    prefix = next((p for p in by_prefix if any(p.endswith(pref + ".") for pref in BLOCK_LIST_PREFERENCES)), None)
    if prefix is None:
        prefix = max(by_prefix, key=lambda p: len(by_prefix[p]))
    sites = by_prefix[prefix]
    depth = depth_hint or (max(sites) + 1)
    if layer is None:
        index = default_router_layer(depth)
    elif layer < 0:
        index = layer + depth
    else:
        index = layer
    if index not in sites:
        raise CheckpointError(
            f"router layer {layer} is out of range: blocks {min(sites)} to {max(sites)} have a router site "
            f"(for example {sites[min(sites)]})"
        )
    return sites[index], index
