"""Build a MASS artifact from a base checkpoint and fine-tuned checkpoints.

One pass over the base's tensors, one tensor at a time: load the base tensor and every
task's tensor, form the task vectors Δᵢ in float32, keep each task's truncated SVD of a
2-D Δᵢ (or the whole Δᵢ of any other tensor), and write θ_MT = θ_base + TSV-M(all
tasks) (mean of the Δᵢ for other tensors) to the shared model. Factors of all tasks
stay in memory until the end (about as large as the factor files).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from mergekit_ext import __version__
from mergekit_ext.checkpoint import Checkpoint, PlannedTensor, StreamingWriter
from mergekit_ext.checkpoint.files import copy_config, copy_tokenizer
from mergekit_ext.device import resolve_device
from mergekit_ext.errors import IncompatibleModelsError, RecipeError
from mergekit_ext.mass.config import (
    FACTORS_FOLDER,
    HEADS_FOLDER,
    TEXT_KINDS,
    MassConfig,
    ModelKind,
    RouterConfig,
    StorageReport,
    check_token_rule,
    factor_file,
    head_file,
)
from mergekit_ext.mass.subspace import LowRankFactors, SvdMethod, redundancy_filter, truncated_svd, tsv_merge
from mergekit_ext.models.heads import CosineHead
from mergekit_ext.models.router_site import find_router_weight_name

logger = logging.getLogger(__name__)

OPEN_CLIP_CONFIG = "open_clip_config.json"


@dataclass(frozen=True)
class MassBuildOptions:
    """Settings of `build_mass_artifact`; the router settings become the artifact's defaults."""

    rank: int | None = None
    rank_fraction: float | None = None
    svd_method: SvdMethod = "full"
    redundancy_epsilon: float | None = None
    router_layer: int | None = None
    router_rank: int | None = None
    token_rule: str | None = None
    threshold: float = 0.2
    top_k: int = 3
    temperature: float = 1.0
    mode: str = "topk"
    reuse_prefix: bool = False
    seed: int = 0
    device: str = "auto"
    force: bool = False


@dataclass(frozen=True)
class MassBuildResult:
    """Output folder, config and build time of one `build_mass_artifact` call."""

    output: Path
    config: MassConfig
    seconds: float


ProgressCallback = Callable[[str, int, int], None]


def detect_model_kind(folder: Path) -> ModelKind:
    """Infer the forward-pass adapter of a checkpoint folder from its config files."""
    if (folder / OPEN_CLIP_CONFIG).is_file():
        return "open-clip"
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise RecipeError(
            f"{folder} has neither config.json nor {OPEN_CLIP_CONFIG}; MASS needs a Hugging Face or "
            "open_clip model folder to know how to run the model"
        )
    config = json.loads(config_path.read_text())
    architectures = config.get("architectures") or []
    if any(a.endswith("ForCausalLM") for a in architectures):
        return "causal-lm"
    if config.get("model_type") in ("clip", "clip_vision_model"):
        return "hf-clip-vision"
    return "hf-encoder"


def resolve_rank(shape: Sequence[int], num_tasks: int, options: MassBuildOptions) -> int:
    """Return the per-task rank of a 2-D tensor: --rank, else ⌊fraction·min(m, n)⌋, else ⌊min(m, n)/T⌋."""
    smallest = min(shape[0], shape[1])
    if options.rank is not None:
        return min(options.rank, smallest)
    if options.rank_fraction is not None:
        return int(options.rank_fraction * smallest)
    return smallest // num_tasks


def _check_options(options: MassBuildOptions, num_tasks: int) -> None:
    if num_tasks < 2:
        raise RecipeError(
            f"MASS needs at least two fine-tuned models, got {num_tasks}; with one task, use the model itself"
        )
    if options.rank is not None and options.rank < 1:
        raise RecipeError(f"--rank {options.rank} is invalid; it must be at least 1")
    if options.rank_fraction is not None and not 0 < options.rank_fraction <= 1:
        raise RecipeError(f"--rank-fraction {options.rank_fraction} is invalid; it must be in (0, 1]")
    if options.rank is not None and options.rank_fraction is not None:
        raise RecipeError("--rank and --rank-fraction both given; pass only one")
    if not 0 < options.threshold < 1:
        raise RecipeError(f"--threshold {options.threshold} is invalid; it must be in (0, 1)")
    if options.top_k < 1:
        raise RecipeError(f"--top-k {options.top_k} is invalid; it must be at least 1")
    if options.router_rank is not None and options.router_rank < 1:
        raise RecipeError(f"--router-rank {options.router_rank} is invalid; it must be at least 1")
    if options.temperature <= 0:
        raise RecipeError(f"--temperature {options.temperature} is invalid; it must be positive")


def _load_heads(head_paths: Sequence[Path], task_names: Sequence[str], feature_size: int | None) -> list[CosineHead]:
    if len(head_paths) != len(task_names):
        raise RecipeError(f"{len(head_paths)} heads given for {len(task_names)} tasks; pass one --heads file per model")
    heads = [CosineHead.load(path) for path in head_paths]
    sizes = {int(head.prototypes.shape[1]) for head in heads}
    if len(sizes) > 1:
        detail = ", ".join(f"{p} ({int(h.prototypes.shape[1])})" for p, h in zip(head_paths, heads))
        raise IncompatibleModelsError(f"heads have different feature sizes: {detail}; every head must read the same embedding")
    if feature_size is not None and sizes != {feature_size}:
        raise IncompatibleModelsError(
            f"heads read {sizes.pop()}-dimensional features but the model's embedding has {feature_size} "
            f"dimensions ({head_paths[0]}); pass the heads trained on these models"
        )
    return heads


def _feature_size(folder: Path, kind: ModelKind) -> int | None:
    config_path = folder / ("config.json" if kind != "open-clip" else OPEN_CLIP_CONFIG)
    if not config_path.is_file():
        return None
    config = json.loads(config_path.read_text())
    if kind == "hf-encoder":
        return config.get("hidden_size")
    if kind == "hf-clip-vision":
        return config.get("projection_dim")
    if kind == "open-clip":
        return config.get("model_cfg", config).get("embed_dim")
    return None


def build_mass_artifact(
    base: str | Path,
    models: Sequence[str | Path],
    output: str | Path,
    *,
    task_names: Sequence[str] | None = None,
    heads: Sequence[str | Path] | None = None,
    options: MassBuildOptions | None = None,
    progress: ProgressCallback | None = None,
) -> MassBuildResult:
    """Write a MASS artifact (shared TSV-M model, per-task factors, heads, config) to `output`."""
    options = options or MassBuildOptions()
    started = time.perf_counter()
    base_path = Path(base)
    model_paths = [Path(m) for m in models]
    _check_options(options, len(model_paths))
    names = list(task_names) if task_names else [p.name for p in model_paths]
    if len(names) != len(model_paths):
        raise RecipeError(f"{len(names)} task names given for {len(model_paths)} models; pass one name per model")
    if len(set(names)) != len(names):
        raise RecipeError(f"task names must be distinct, got {names}")

    device = resolve_device(options.device)
    base_checkpoint = Checkpoint.open(base_path)
    task_checkpoints = [Checkpoint.open(p) for p in model_paths]
    kind = detect_model_kind(base_path if base_path.is_dir() else base_path.parent)
    head_list = _load_heads([Path(h) for h in heads], names, _feature_size(base_path, kind)) if heads else []
    _check_tensor_names(base_checkpoint, task_checkpoints)
    router_weight, router_layer = find_router_weight_name(base_checkpoint.names, options.router_layer)
    token_rule = options.token_rule or ("mean" if kind in TEXT_KINDS else "cls")
    check_token_rule(token_rule, kind)

    plan = [PlannedTensor(n, base_checkpoint.info(n).shape, base_checkpoint.info(n).dtype) for n in base_checkpoint.names]
    factors: list[dict[str, torch.Tensor]] = [{} for _ in model_paths]
    subsets: dict[str, list[int]] = {}
    logger.info("Building MASS artifact of %d tasks from %s into %s", len(names), base_path, output)

    with StreamingWriter(output, plan, force=options.force, inputs=[base_path, *model_paths]) as writer:
        for step, name in enumerate(base_checkpoint.names):
            base_tensor = base_checkpoint.load(name)
            shared, kept = _merge_tensor(name, base_tensor, task_checkpoints, factors, options, device)
            if kept is not None:
                subsets[name] = kept
            writer.write(name, shared.to(base_tensor.dtype).cpu())
            if progress is not None:
                progress(name, step + 1, len(plan))

        folder = writer.folder
        source_folder = base_path if base_path.is_dir() else base_path.parent
        copy_config(writer, source_folder, None)
        copy_tokenizer(writer, source_folder)
        if (source_folder / OPEN_CLIP_CONFIG).is_file():
            writer.copy_file(source_folder / OPEN_CLIP_CONFIG)
        (folder / FACTORS_FOLDER).mkdir(parents=True, exist_ok=True)
        for index, task_factors in enumerate(factors):
            save_file(task_factors, str(folder / factor_file(index)), metadata={"task": names[index]})
        if head_list:
            (folder / HEADS_FOLDER).mkdir(parents=True, exist_ok=True)
            for index, head in enumerate(head_list):
                head.save(folder / head_file(index))

        storage = StorageReport(
            shared_bytes=base_checkpoint.total_bytes,
            factor_bytes=sum((folder / factor_file(i)).stat().st_size for i in range(len(names))),
            head_bytes=sum((folder / head_file(i)).stat().st_size for i in range(len(head_list))),
            one_model_bytes=base_checkpoint.total_bytes,
        )
        config = MassConfig(
            model_kind=kind,
            task_names=names,
            rank=options.rank,
            rank_fraction=options.rank_fraction,
            svd_method=options.svd_method,
            seed=options.seed,
            router=RouterConfig(
                layer=router_layer,
                site=router_weight.removesuffix(".weight"),
                weight=router_weight,
                token_rule=token_rule,  # type: ignore[arg-type]
                threshold=options.threshold,
                top_k=options.top_k,
                temperature=options.temperature,
                mode=options.mode,  # type: ignore[arg-type]
                rank=options.router_rank,
            ),
            has_heads=bool(head_list),
            reuse_prefix=options.reuse_prefix,
            redundancy_epsilon=options.redundancy_epsilon,
            shared_task_subsets=subsets,
            storage=storage,
            tool_version=__version__,
        )
        config.save(folder)
        written = writer.commit()

    seconds = time.perf_counter() - started
    logger.info(
        "Wrote %s in %.1f s: %.1f MB, %.2f times one model",
        written,
        seconds,
        storage.total_bytes / 1e6,
        storage.storage_factor,
    )
    return MassBuildResult(output=written, config=config, seconds=seconds)


def _check_tensor_names(base: Checkpoint, tasks: Sequence[Checkpoint]) -> None:
    base_names = set(base.names)
    for checkpoint in tasks:
        missing = base_names - set(checkpoint.names)
        extra = set(checkpoint.names) - base_names
        if missing or extra:
            example = sorted(missing or extra)[0]
            raise IncompatibleModelsError(
                f"{checkpoint.path} and the base {base.path} hold different tensors ({len(missing)} missing, "
                f"{len(extra)} extra, for example {example!r}); MASS needs models fine-tuned from the same base"
            )
        for name in base.names:
            if checkpoint.info(name).shape != base.info(name).shape:
                raise IncompatibleModelsError(
                    f"tensor {name!r} has shape {checkpoint.info(name).shape} in {checkpoint.path} but "
                    f"{base.info(name).shape} in the base {base.path}; MASS needs models of one architecture"
                )


def _merge_tensor(
    name: str,
    base_tensor: torch.Tensor,
    tasks: Sequence[Checkpoint],
    factors: list[dict[str, torch.Tensor]],
    options: MassBuildOptions,
    device: torch.device,
) -> tuple[torch.Tensor, list[int] | None]:
    """Return the shared tensor, storing the task factors; the second item lists tasks the filter kept."""
    if not base_tensor.is_floating_point():
        return base_tensor, None
    base32 = base_tensor.to(device=device, dtype=torch.float32)
    deltas = [t.load(name).to(device=device, dtype=torch.float32) - base32 for t in tasks]
    if all(not bool(torch.any(delta != 0)) for delta in deltas):
        return base_tensor, None

    storage_dtype = base_tensor.dtype
    rank = resolve_rank(base_tensor.shape, len(tasks), options) if base_tensor.ndim == 2 else 0
    if rank < 1:
        for index, delta in enumerate(deltas):
            factors[index][f"{name}.delta"] = delta.to(storage_dtype).cpu().contiguous()
        return base32 + torch.stack(deltas).mean(dim=0), None

    task_factors: list[LowRankFactors] = []
    for index, delta in enumerate(deltas):
        low_rank = truncated_svd(delta, rank, method=options.svd_method, seed=options.seed)
        task_factors.append(low_rank)
        factors[index][f"{name}.u"] = low_rank.u.to(storage_dtype).cpu().contiguous()
        factors[index][f"{name}.s"] = low_rank.s.to(storage_dtype).cpu().contiguous()
        factors[index][f"{name}.vh"] = low_rank.vh.to(storage_dtype).cpu().contiguous()

    kept = None
    if options.redundancy_epsilon is not None:
        kept = redundancy_filter(task_factors, options.redundancy_epsilon)
        task_factors = [task_factors[i] for i in kept]
        if len(kept) == len(tasks):
            kept = None
    return base32 + tsv_merge(task_factors), kept
