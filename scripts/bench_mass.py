"""Benchmark: MASS artifact build time (full and randomized SVD) against a dense TSV-M merge.

Eight task models of a ViT-B/32-sized image tower (open_clip layout, random weights, no
download) are written to a temporary folder. Task vectors are random with a power-law
spectrum (singular values falling as 1/j), closer to fine-tuning updates than white
noise, on which a truncated SVD would be pointless. Three timings in one run:

- MASS build, full SVD: `build_mass_artifact` (streams tensors, writes shared model and factors);
- MASS build, randomized SVD: the same with `svd_method="randomized"`, plus the relative
  error of the shared model against the full-SVD build;
- dense TSV-M as FusionBench computes it: every model loaded whole into memory, task
  vectors formed for all tensors, then per tensor the per-task SVDs, the polar factors
  and the merged matrix, written once at the end.

Usage: python scripts/bench_mass.py [--tasks 8] [--layers 12] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from mergekit_ext.mass.build import MassBuildOptions, build_mass_artifact
from mergekit_ext.mass.subspace import truncated_svd
from mergekit_ext.methods.svd import polar_factor

WIDTH = 768
PATCH = 32
IMAGE = 224
EMBED = 512


def vit_b32_visual_shapes(layers: int) -> dict[str, tuple[int, ...]]:
    """Tensor shapes of the open_clip ViT-B-32 image tower (`visual.*`)."""
    tokens = (IMAGE // PATCH) ** 2 + 1
    shapes: dict[str, tuple[int, ...]] = {
        "visual.class_embedding": (WIDTH,),
        "visual.positional_embedding": (tokens, WIDTH),
        "visual.proj": (WIDTH, EMBED),
        "visual.conv1.weight": (WIDTH, 3, PATCH, PATCH),
        "visual.ln_pre.weight": (WIDTH,),
        "visual.ln_pre.bias": (WIDTH,),
        "visual.ln_post.weight": (WIDTH,),
        "visual.ln_post.bias": (WIDTH,),
    }
    for block in range(layers):
        prefix = f"visual.transformer.resblocks.{block}."
        shapes.update({
            prefix + "ln_1.weight": (WIDTH,), prefix + "ln_1.bias": (WIDTH,),
            prefix + "attn.in_proj_weight": (3 * WIDTH, WIDTH), prefix + "attn.in_proj_bias": (3 * WIDTH,),
            prefix + "attn.out_proj.weight": (WIDTH, WIDTH), prefix + "attn.out_proj.bias": (WIDTH,),
            prefix + "ln_2.weight": (WIDTH,), prefix + "ln_2.bias": (WIDTH,),
            prefix + "mlp.c_fc.weight": (4 * WIDTH, WIDTH), prefix + "mlp.c_fc.bias": (4 * WIDTH,),
            prefix + "mlp.c_proj.weight": (WIDTH, 4 * WIDTH), prefix + "mlp.c_proj.bias": (WIDTH,),
        })  # fmt: skip
    return shapes


def open_clip_config(layers: int) -> dict[str, object]:
    """Return the open_clip ViT-B-32 model config with `layers` image blocks (the text tower is not written)."""
    return {
        "embed_dim": EMBED,
        "vision_cfg": {"image_size": IMAGE, "layers": layers, "width": WIDTH, "patch_size": PATCH},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 512, "heads": 8, "layers": 12},
    }


def task_vector(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    if len(shape) != 2:
        return 1e-3 * torch.randn(shape, generator=generator)
    rank = min(shape)
    left = torch.randn(shape[0], rank, generator=generator) / shape[0] ** 0.5
    right = torch.randn(rank, shape[1], generator=generator) / shape[1] ** 0.5
    decay = 1.0 / torch.arange(1, rank + 1, dtype=torch.float32)
    return 1e-2 * (left * decay) @ right


def write_models(root: Path, tasks: int, layers: int) -> tuple[Path, list[Path]]:
    """Write the base and the task models (open_clip layout, random) and return their folders."""
    shapes = vit_b32_visual_shapes(layers)
    generator = torch.Generator().manual_seed(0)
    base = {name: 0.02 * torch.randn(shape, generator=generator) for name, shape in shapes.items()}
    folders = []
    for index in range(tasks + 1):
        folder = root / ("base" if index == 0 else f"task{index}")
        folder.mkdir()
        tensors = base if index == 0 else {n: t + task_vector(t.shape, generator) for n, t in base.items()}
        save_file(tensors, str(folder / "model.safetensors"))
        (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": open_clip_config(layers)}))
        folders.append(folder)
    return folders[0], folders[1:]


def dense_tsv_merge(base: Path, models: list[Path], output: Path, device: torch.device) -> None:
    """TSV-M as FusionBench runs it: whole state dicts in memory, then tensor by tensor."""
    base_state = {n: t.to(device) for n, t in load_file(str(base / "model.safetensors")).items()}
    task_vectors = []
    for model in models:
        state = load_file(str(model / "model.safetensors"))
        task_vectors.append({n: state[n].to(device) - base_state[n] for n in base_state})
    merged = {}
    count = len(models)
    for name, base_tensor in base_state.items():
        deltas = [vectors[name] for vectors in task_vectors]
        rank = min(base_tensor.shape) // count if base_tensor.ndim == 2 else 0
        if rank == 0:
            merged[name] = (base_tensor + torch.stack(deltas).mean(dim=0)).cpu()
            continue
        factors = [torch.linalg.svd(delta, full_matrices=False) for delta in deltas]
        left = polar_factor(torch.cat([u[:, :rank] for u, _, _ in factors], dim=1))
        right = polar_factor(torch.cat([vh[:rank].T for _, _, vh in factors], dim=1))
        sigma = torch.cat([s[:rank] for _, s, _ in factors])
        merged[name] = (base_tensor + (left * sigma) @ right.T).cpu()
    save_file(merged, str(output))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--layers", type=int, default=12, help="image tower blocks (ViT-B/32 has 12)")
    parser.add_argument("--device", default="cpu")
    arguments = parser.parse_args()
    device = torch.device(arguments.device)

    root = Path(tempfile.mkdtemp(prefix="bench_mass_"))
    try:
        base, models = write_models(root, arguments.tasks, arguments.layers)
        parameters = sum(t.numel() for t in load_file(str(base / "model.safetensors")).values())
        print(f"{arguments.tasks} tasks, image tower with {arguments.layers} blocks, {parameters / 1e6:.1f}M parameters, "
              f"{torch.get_num_threads()} threads on {device}")  # fmt: skip

        timings: dict[str, float] = {}
        for method in ("full", "randomized"):
            started = time.perf_counter()
            build_mass_artifact(
                base, models, root / f"mass_{method}",
                options=MassBuildOptions(svd_method=method, device=str(device), router_layer=-1),
            )  # fmt: skip
            timings[f"MASS build, {method} SVD"] = time.perf_counter() - started

        started = time.perf_counter()
        dense_tsv_merge(base, models, root / "dense_tsv.safetensors", device)
        timings["dense TSV-M (FusionBench-style)"] = time.perf_counter() - started

        # Truncation error of randomized against full SVD (Eckart-Young: full is optimal),
        # on the largest matrix of the first block, every task.
        name = "visual.transformer.resblocks.0.mlp.c_fc.weight"
        base_matrix = load_file(str(base / "model.safetensors"))[name]
        rank = min(base_matrix.shape) // len(models)
        excess = []
        for model in models:
            delta = load_file(str(model / "model.safetensors"))[name] - base_matrix
            full_error = (delta - truncated_svd(delta, rank).dense()).norm()
            randomized_error = (delta - truncated_svd(delta, rank, method="randomized").dense()).norm()
            excess.append(float(randomized_error / full_error) - 1.0)

        full = load_file(str(root / "mass_full" / "model.safetensors"))
        randomized = load_file(str(root / "mass_randomized" / "model.safetensors"))
        dense = load_file(str(root / "dense_tsv.safetensors"))
        base_state = load_file(str(base / "model.safetensors"))
        worst_randomized = max(
            float((randomized[n] - full[n]).norm() / (full[n] - base_state[n]).norm().clamp_min(1e-12)) for n in full
        )
        worst_dense = max(float((dense[n] - full[n]).norm() / (full[n] - base_state[n]).norm().clamp_min(1e-12)) for n in full)

        reference = timings["dense TSV-M (FusionBench-style)"]
        for label, seconds in timings.items():
            print(f"{label:38s} {seconds:8.1f} s   {seconds / reference:5.2f}x dense TSV-M")
        print(f"rank-{rank} truncation error of randomized SVD above the optimal (full) one, worst task: {max(excess):.2%}")
        print(f"largest relative difference of the merged task vector, randomized vs full SVD: {worst_randomized:.2e}")
        print(f"largest relative difference of the merged task vector, dense TSV-M vs MASS shared model: {worst_dense:.2e}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
