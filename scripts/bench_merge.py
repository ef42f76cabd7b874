"""Benchmark: mergekit-ext against mergekit 0.1.5 on TIES and task arithmetic.

Writes a base and four fine-tuned checkpoints of a Qwen2-0.5B-shaped model (random
weights, bf16, about 1 GB each) to a temporary folder once, then runs each merge with
`merge run` and with `mergekit-yaml` on the same recipe, alternating the two tools,
each in its own process measured by GNU time (wall seconds, peak RSS). mergekit-ext
runs twice per round: with an empty digest cache (it hashes every input for the
model card) and with the digests already known. The script also times a plain
sequential read of the input files with `cat` and the same read with O_DIRECT
(`dd iflag=direct`). The O_DIRECT read skips the page cache, so it is the disk's limit
where filling the page cache costs much CPU time, as on the 2-core development VM.

Run: python scripts/bench_merge.py [--repeats 2] [--workdir DIR] [--drop-caches | --evict-inputs]

--drop-caches empties the whole page cache before every run (as after a reboot), so
each tool also loads its own code (torch, for one) from the disk. --evict-inputs drops
only the checkpoints and outputs, as for a merge of new inputs on a machine that has
run the tools before.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

# Qwen2-0.5B shapes: hidden 896, 24 layers, 14 query heads and 2 key/value heads of 64.
HIDDEN = 896
LAYERS = 24
INTERMEDIATE = 4864
VOCAB = 151936
KV = 128


def qwen2_shapes() -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (VOCAB, HIDDEN)}
    for layer in range(LAYERS):
        prefix = f"model.layers.{layer}"
        shapes[f"{prefix}.self_attn.q_proj.weight"] = (HIDDEN, HIDDEN)
        shapes[f"{prefix}.self_attn.q_proj.bias"] = (HIDDEN,)
        shapes[f"{prefix}.self_attn.k_proj.weight"] = (KV, HIDDEN)
        shapes[f"{prefix}.self_attn.k_proj.bias"] = (KV,)
        shapes[f"{prefix}.self_attn.v_proj.weight"] = (KV, HIDDEN)
        shapes[f"{prefix}.self_attn.v_proj.bias"] = (KV,)
        shapes[f"{prefix}.self_attn.o_proj.weight"] = (HIDDEN, HIDDEN)
        shapes[f"{prefix}.mlp.gate_proj.weight"] = (INTERMEDIATE, HIDDEN)
        shapes[f"{prefix}.mlp.up_proj.weight"] = (INTERMEDIATE, HIDDEN)
        shapes[f"{prefix}.mlp.down_proj.weight"] = (HIDDEN, INTERMEDIATE)
        shapes[f"{prefix}.input_layernorm.weight"] = (HIDDEN,)
        shapes[f"{prefix}.post_attention_layernorm.weight"] = (HIDDEN,)
    shapes["model.norm.weight"] = (HIDDEN,)
    return shapes


def qwen2_config() -> dict[str, object]:
    return {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "hidden_size": HIDDEN,
        "intermediate_size": INTERMEDIATE,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": 14,
        "num_key_value_heads": 2,
        "vocab_size": VOCAB,
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": True,
        "torch_dtype": "bfloat16",
    }


def write_models(root: Path, count: int) -> list[Path]:
    names = ["base", *(f"model-{index}" for index in range(1, count + 1))]
    if all((root / name / "model.safetensors").is_file() for name in names):
        return [root / name for name in names]  # written by an earlier run in this workdir
    shutil.rmtree(root, ignore_errors=True)
    shapes = qwen2_shapes()
    generator = torch.Generator().manual_seed(0)
    base_state = {name: (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16) for name, shape in shapes.items()}
    folders = []
    for index in range(count + 1):
        folder = root / ("base" if index == 0 else f"model-{index}")
        folder.mkdir(parents=True)
        if index == 0:
            state = base_state
        else:
            state = {
                name: (tensor.float() + torch.randn(tensor.shape, generator=generator) * 0.002).to(torch.bfloat16)
                for name, tensor in base_state.items()
            }
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
        (folder / "config.json").write_text(json.dumps(qwen2_config(), indent=2))
        folders.append(folder)
        del state
    return folders


def write_recipe(path: Path, method: str, base: Path, models: list[Path]) -> Path:
    lines = [f"merge_method: {method}", f"base_model: {base}", "models:"]
    for model in models:
        lines.append(f"  - model: {model}")
        lines.append("    parameters:")
        lines.append("      weight: 0.5")
        if method == "ties":
            lines.append("      density: 0.5")
    lines.append("dtype: bfloat16")
    path.write_text("\n".join(lines) + "\n")
    return path


def timed(command: list[str], cold: str, root: Path, env: dict[str, str] | None = None) -> tuple[float, int]:
    """Run `command` under GNU time; return wall seconds and peak RSS in bytes.

    `cold` names what leaves the page cache first: "all" (every cached file, root
    only), "inputs" (the checkpoints and outputs under `root`) or "none".
    """
    if cold != "none":
        subprocess.run(["sync"], check=True)
    if cold == "all":
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    elif cold == "inputs":
        for path in root.glob("*/**/*"):
            if path.is_file() and not path.name.endswith(".time"):
                descriptor = os.open(path, os.O_RDONLY)
                try:
                    os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)
                finally:
                    os.close(descriptor)
    report = Path(tempfile.mkstemp(suffix=".time")[1])
    started = time.perf_counter()
    subprocess.run(["/usr/bin/time", "-f", "%M", "-o", str(report), *command], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})})
    wall = time.perf_counter() - started
    peak_kib = int(report.read_text().strip().splitlines()[-1])
    report.unlink()
    return wall, peak_kib * 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--models", type=int, default=4, help="Fine-tuned checkpoints merged onto the base.")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--drop-caches", action="store_true", help="Drop the page cache before each run (root only).")
    parser.add_argument(
        "--evict-inputs",
        action="store_true",
        help="Before each run, drop only the pages of the input and output files (no root needed). "
        "The tools' own code stays cached, as on a machine that ran them before.",
    )
    args = parser.parse_args()
    if args.drop_caches and args.evict_inputs:
        parser.error("choose one of --drop-caches and --evict-inputs")
    cold = "none"
    if args.drop_caches:
        cold = "all"
    elif args.evict_inputs:
        cold = "inputs"

    root = args.workdir or Path(tempfile.mkdtemp(prefix="bench-merge-"))
    bin_folder = Path(sys.executable).parent
    try:
        print(f"Writing {args.models + 1} Qwen2-0.5B-shaped bf16 checkpoints to {root} ...", flush=True)
        folders = write_models(root / "inputs", args.models)
        base, models = folders[0], folders[1:]
        input_bytes = sum((folder / "model.safetensors").stat().st_size for folder in folders)

        # mergekit-ext hashes its inputs for the model card and remembers the digests by
        # file identity. "first" runs with an empty cache (the first merge of new inputs,
        # hashing included); "repeat" with the digests known (any later merge of them).
        known_hashes = root / "cache-known"
        ours_variants = ("mergekit-ext first", "mergekit-ext repeat")
        tool_names = (*ours_variants, "mergekit")
        results: dict[tuple[str, str], list[tuple[float, int]]] = {}
        read_times = []
        direct_times = []
        for repeat in range(args.repeats):
            read_times.append(timed(["cat", *(str(f / "model.safetensors") for f in folders)], cold, root)[0])
            # The same read with O_DIRECT, which skips the page cache as mergekit-ext's reader does.
            direct_read = " && ".join(
                f"dd if={f / 'model.safetensors'} of=/dev/null bs=8M iflag=direct status=none" for f in folders
            )
            direct_times.append(timed(["bash", "-c", direct_read], cold, root)[0])
            for method in ("ties", "task_arithmetic"):
                recipe = write_recipe(root / f"{method}.yaml", method, base, models)
                ours = [str(bin_folder / "merge"), "run", str(recipe), "--output", str(root / "ours"), "--force"]
                tools = [
                    ("mergekit-ext first", ours, {"MERGEKIT_EXT_CACHE": str(root / f"cache-empty-{repeat}-{method}")}),
                    ("mergekit", [str(bin_folder / "mergekit-yaml"), str(recipe), str(root / "theirs"),
                                  "--no-copy-tokenizer", "--lazy-unpickle"], {}),
                    ("mergekit-ext repeat", ours, {"MERGEKIT_EXT_CACHE": str(known_hashes)}),
                ]
                if repeat % 2:
                    tools.reverse()  # alternate the order of the tools
                for tool, command, env in tools:
                    # Both tools write into a new folder. With the previous output still there,
                    # `--force` removed it within the timed run: 0.2 to 0.27 s for 0.99 GB on
                    # the development VM, whose file system discards freed blocks at once.
                    shutil.rmtree(root / "theirs", ignore_errors=True)
                    shutil.rmtree(root / "ours", ignore_errors=True)
                    if tool == "mergekit-ext repeat" and not known_hashes.exists():
                        timed(command, "none", root, env)  # fills the digest cache and is not measured
                        shutil.rmtree(root / "ours", ignore_errors=True)
                    results.setdefault((method, tool), []).append(timed(command, cold, root, env))

        plain_read = statistics.median(read_times)
        direct_read_time = statistics.median(direct_times)
        print(f"\ninput: {input_bytes / 1e9:.2f} GB in {len(folders)} files; plain sequential read "
              f"{plain_read:.2f} s ({input_bytes / plain_read / 1e9:.2f} GB/s, runs: {_runs(read_times)}); "
              f"with O_DIRECT (dd) {direct_read_time:.2f} s (runs: {_runs(direct_times)}); "
              f"page cache emptied before each run: {cold}; CPUs: {os.cpu_count()}")
        print("Times are medians over the rounds; the last column lists every round's time.")
        print(f"{'method':<16}{'tool':<21}{'wall s':>9}{'peak RSS GB':>13}{'read GB/s':>11}  runs s")
        for method in ("ties", "task_arithmetic"):
            for tool in tool_names:
                walls = [r[0] for r in results[(method, tool)]]
                wall = statistics.median(walls)
                peak = max(r[1] for r in results[(method, tool)])
                print(f"{method:<16}{tool:<21}{wall:>9.2f}{peak / 1e9:>13.2f}{input_bytes / wall / 1e9:>11.2f}  "
                      f"{_runs(walls)}")
            theirs = statistics.median(r[0] for r in results[(method, "mergekit")])
            theirs_peak = max(r[1] for r in results[(method, "mergekit")])
            for tool in ours_variants:
                ours_wall = statistics.median(r[0] for r in results[(method, tool)])
                ours_peak = max(r[1] for r in results[(method, tool)])
                print(f"  {method}, {tool}: wall-time ratio mergekit/mergekit-ext = {theirs / ours_wall:.2f}x, "
                      f"peak-RSS ratio mergekit/mergekit-ext = {theirs_peak / ours_peak:.2f}x, "
                      f"mergekit-ext time / plain read = {ours_wall / plain_read:.2f}x, "
                      f"/ O_DIRECT read = {ours_wall / direct_read_time:.2f}x")
                # The disk's speed drifts between minutes, so each round is also set against its own read.
                rounds = [r[0] / direct for r, direct in zip(results[(method, tool)], direct_times)]
                print(f"    each round / that round's O_DIRECT read: {' / '.join(f'{x:.2f}x' for x in rounds)}")
    finally:
        if args.workdir is None:
            shutil.rmtree(root, ignore_errors=True)


def _runs(times: list[float]) -> str:
    return " / ".join(f"{value:.2f}" for value in times)


if __name__ == "__main__":
    main()
