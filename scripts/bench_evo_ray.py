"""Benchmark the Ray fitness backend against the in-process backend: candidates per minute.

Evaluates the same candidates and problems with:

- in-process: the sequential backend in this process, with 1 thread and with
  as many threads as the largest actor count (the fair single-process rival);
- ray-N: N Ray actors on a local loopback cluster, 1 CPU and 1 thread each,
  every actor running the sequential backend.

Throughput counts only evaluation time; startup (Ray cluster, actor model load)
is reported on its own line, since a search pays it once. The objectives of
every Ray run are checked against the in-process ones.

Usage:
  python scripts/bench_evo_ray.py --zoo ~/.cache/mergekit-ext/zoo/reasoning-small-3 \
      --candidates 8 --problems 8 --max-new-tokens 64 --actors 1 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from mergekit_ext.evo.backends import SequentialBackend
from mergekit_ext.evo.config import parse_config
from mergekit_ext.evo.data import load_benchmark
from mergekit_ext.evo.ray_cluster import RaySettings, import_ray


def evaluation_config(zoo: Path, problems: int, max_new_tokens: int):
    return parse_config({
        "search_space": {"base_model": str(zoo / "long"), "models": [str(zoo / "short")]},
        "data": {"problems": str(zoo / "data" / "pool.jsonl"), "limit": problems},
        "generation": {"max_new_tokens": max_new_tokens, "batch_size": problems},
        "backend": "sequential",
    })  # fmt: skip


def time_in_process(config, genomes, problems, threads: int) -> tuple[float, float, list]:
    """Return (load seconds, evaluation seconds, results) of the sequential backend in this process."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        started = time.perf_counter()
        backend = SequentialBackend(config.search_space, config.generation, torch.device("cpu"), torch.float32)
        loaded = time.perf_counter()
        results = backend.evaluate(genomes, problems)
        return loaded - started, time.perf_counter() - loaded, results
    finally:
        torch.set_num_threads(previous)


def time_ray(config, genomes, problems, actors: int) -> tuple[float, float, list]:
    """Return (actor start seconds, evaluation seconds, results) of the Ray backend with `actors` actors."""
    from mergekit_ext.evo.ray_backend import RayBackend

    started = time.perf_counter()
    with RayBackend(config, RaySettings(num_actors=actors), "cpu") as backend:
        loaded = time.perf_counter()
        results = backend.evaluate(genomes, problems)
        return loaded - started, time.perf_counter() - loaded, results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--zoo", required=True, type=Path, help="Reasoning zoo folder (long/, short/, data/).")
    parser.add_argument("--candidates", type=int, default=8)
    parser.add_argument("--problems", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--actors", type=int, nargs="+", default=[1, 2], help="Actor counts to measure.")
    parser.add_argument("--output", type=Path, help="Write the results as JSON here.")
    arguments = parser.parse_args()

    config = evaluation_config(arguments.zoo, arguments.problems, arguments.max_new_tokens)
    space = config.search_space
    genomes = [space.decode([round(i / max(1, arguments.candidates - 1), 4)]) for i in range(arguments.candidates)]
    problems = load_benchmark(config.data.problems, limit=arguments.problems)

    ray = import_ray(local_cluster=True)
    started = time.perf_counter()
    ray.init(num_cpus=max(arguments.actors), include_dashboard=False, _node_ip_address="127.0.0.1",
             log_to_driver=False)  # fmt: skip
    cluster_seconds = time.perf_counter() - started

    rows: dict[str, dict] = {}
    reference = None
    for threads in sorted({1, max(arguments.actors)}):
        load, seconds, results = time_in_process(config, genomes, problems, threads)
        reference = reference or results
        rows[f"in-process-{threads}t"] = {"startup_s": load, "seconds": seconds, "results": results}
    for actors in arguments.actors:
        startup, seconds, results = time_ray(config, genomes, problems, actors)
        rows[f"ray-{actors}"] = {"startup_s": startup, "seconds": seconds, "results": results}
    ray.shutdown()

    baseline = rows["in-process-1t"]["seconds"]
    report = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                   f"load average {os.getloadavg()[0]:.1f} at the end",
        "candidates": len(genomes),
        "problems": len(problems),
        "max_new_tokens": arguments.max_new_tokens,
        "ray_cluster_start_s": cluster_seconds,
        "runs": {},
    }  # fmt: skip
    print(f"{len(genomes)} candidates x {len(problems)} problems, max {arguments.max_new_tokens} new tokens; "
          f"Ray cluster start {cluster_seconds:.1f} s")
    for name, row in rows.items():
        per_minute = 60.0 * len(genomes) / row["seconds"]
        same = [(a.accuracy, a.mean_tokens) for a in row["results"]] == [(a.accuracy, a.mean_tokens) for a in reference]
        report["runs"][name] = {"startup_s": row["startup_s"], "seconds": row["seconds"],
                                "candidates_per_minute": per_minute, "ratio_vs_in_process_1t": baseline / row["seconds"],
                                "same_objectives_as_in_process": same}  # fmt: skip
        print(f"{name:<16} startup {row['startup_s']:6.1f} s  evaluation {row['seconds']:7.1f} s  "
              f"{per_minute:8.2f} candidates/min  x{baseline / row['seconds']:.2f} vs in-process-1t  "
              f"same objectives: {same}")
    print(f"machine: {report['machine']}")
    if arguments.output is not None:
        arguments.output.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
