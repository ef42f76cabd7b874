"""Benchmark Evo-L2S fitness backends: candidates evaluated per minute.

Compares, on the same candidates and problems:

- disk: merge each candidate to disk with the streaming engine, load it with
  transformers, decode (the shape of the original Evo-L2S pipeline, which
  merges to disk and starts a new vLLM engine per candidate);
- sequential: one resident model, merged weights written in place;
- population: base weights and task vectors resident, many candidates per batch.

Usage:
  python scripts/bench_evo.py --zoo ~/.cache/mergekit-ext/zoo/reasoning-3 \
      --candidates 10 --problems 50 --max-new-tokens 128 --threads 1 [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from mergekit_ext.device import resolve_device
from mergekit_ext.engine import MergeOptions, run_recipe
from mergekit_ext.evo.backends import PopulationBackend, SequentialBackend, load_model, load_tokenizer
from mergekit_ext.evo.data import load_benchmark
from mergekit_ext.evo.fitness import score
from mergekit_ext.evo.generation import GenerationSettings, format_prompt, generate_greedy
from mergekit_ext.evo.genome import SearchSpace
from mergekit_ext.evo.merge_memory import checkpoint_layers, genome_recipe


def disk_backend(space, genomes, problems, settings, device, dtype):
    tokenizer = load_tokenizer(space.base_model)
    prompts = [format_prompt(tokenizer, problem.question, settings) for problem in problems]
    num_layers = checkpoint_layers(space.base_model)
    results = []
    with tempfile.TemporaryDirectory() as scratch:
        for index, genome in enumerate(genomes):
            target = Path(scratch) / f"candidate-{index}"
            run_recipe(genome_recipe(genome, num_layers), MergeOptions(output=target, device="cpu"))
            model = load_model(str(target), device, dtype)
            results.append(score(problems, generate_greedy(model, tokenizer, prompts, settings)))
            del model
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--zoo", required=True, type=Path, help="Reasoning zoo folder (long/, short/, data/).")
    parser.add_argument("--candidates", type=int, default=10)
    parser.add_argument("--problems", type=int, default=50)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--candidates-per-batch", type=int, default=10)
    parser.add_argument("--output", type=Path, help="Write the results as JSON here.")
    arguments = parser.parse_args()
    if arguments.threads is not None:
        torch.set_num_threads(arguments.threads)

    device = resolve_device(arguments.device)
    dtype = getattr(torch, arguments.dtype)
    space = SearchSpace(base_model=str(arguments.zoo / "long"), models=[str(arguments.zoo / "short")])
    genomes = [space.decode([round(i / max(1, arguments.candidates - 1), 4)]) for i in range(arguments.candidates)]
    problems = load_benchmark(str(arguments.zoo / "data" / "pool.jsonl"), limit=arguments.problems)
    settings = GenerationSettings(max_new_tokens=arguments.max_new_tokens, batch_size=arguments.problems)

    # Wall time and this process's CPU time: on a CPU shared with other jobs the CPU
    # time of a one-thread run is the better estimate of the time on an idle machine.
    timings: dict[str, float] = {}
    cpu_timings: dict[str, float] = {}
    outputs = {}
    runs = {
        "disk": lambda: disk_backend(space, genomes, problems, settings, device, dtype),
        "sequential": lambda: SequentialBackend(space, settings, device, dtype).evaluate(genomes, problems),
        "population": lambda: PopulationBackend(
            space, settings, device, dtype, arguments.candidates_per_batch
        ).evaluate(genomes, problems),
    }
    for name, run in runs.items():
        started, cpu_started = time.perf_counter(), time.process_time()
        outputs[name] = run()
        if device.type == "cuda":
            torch.cuda.synchronize()
        timings[name] = time.perf_counter() - started
        cpu_timings[name] = time.process_time() - cpu_started

    per_minute = {name: 60.0 * len(genomes) / seconds for name, seconds in timings.items()}
    per_cpu_minute = {name: 60.0 * len(genomes) / seconds for name, seconds in cpu_timings.items()}
    same = {
        name: sum(a.accuracy == b.accuracy and a.mean_tokens == b.mean_tokens
                  for a, b in zip(outputs["disk"], outputs[name])) / len(genomes)
        for name in ("sequential", "population")
    }  # fmt: skip
    report = {
        "machine": f"{platform.processor() or platform.machine()}, torch threads {torch.get_num_threads()}",
        "device": str(device),
        "dtype": arguments.dtype,
        "candidates": len(genomes),
        "problems": len(problems),
        "max_new_tokens": arguments.max_new_tokens,
        "seconds": timings,
        "cpu_seconds": cpu_timings,
        "candidates_per_cpu_minute": per_cpu_minute,
        "candidates_per_minute": per_minute,
        "speedup_vs_disk": {name: per_minute[name] / per_minute["disk"] for name in per_minute},
        "same_objectives_as_disk": same,
    }
    for name in ("disk", "sequential", "population"):
        print(f"{name:<11} wall {timings[name]:7.1f} s  {per_minute[name]:8.2f} candidates/min  "
              f"x{report['speedup_vs_disk'][name]:.2f} vs disk | CPU {cpu_timings[name]:7.1f} s  "
              f"{per_cpu_minute[name]:8.2f} candidates/CPU-min  x{per_cpu_minute[name] / per_cpu_minute['disk']:.2f}")
    print(f"population / sequential: wall x{per_minute['population'] / per_minute['sequential']:.2f}, "
          f"CPU x{per_cpu_minute['population'] / per_cpu_minute['sequential']:.2f}")
    print(f"same objectives as disk: {same}")
    if arguments.output is not None:
        arguments.output.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
