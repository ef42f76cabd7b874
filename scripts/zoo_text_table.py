"""Accuracy table of the text zoo: every fine-tuned model on every task, the base, and merges.

Each text goes to its own task's head (the task is known), on the test splits of a
built text zoo. The rows are the base encoder, each task's fine-tuned encoder, and
the task arithmetic, TIES and TSV-M merges of all tasks with the settings of
`merge demo`. The script prints a Markdown table of accuracies and the normalized
average, and writes the numbers as JSON.

Run: python scripts/zoo_text_table.py [--zoo DIR] [--work DIR] [--json table.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from mergekit_ext.engine import MergeOptions, run_recipe
from mergekit_ext.mass.demo import CLASSIC_MERGES
from mergekit_ext.recipe import parse_recipe
from mergekit_ext.zoo.evaluate import evaluate_text_zoo, read_manifest
from mergekit_ext.zoo.text import default_zoo_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", type=Path, default=default_zoo_dir())
    parser.add_argument("--work", type=Path, default=None, help="Folder for the merged models (default: a new temporary folder).")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    manifest = read_manifest(args.zoo)
    tasks = list(manifest["tasks"])
    base = args.zoo / manifest["base_model"]
    finetuned = {task: args.zoo / manifest["tasks"][task]["model"] for task in tasks}
    work = args.work or Path(tempfile.mkdtemp(prefix="zoo-text-table-"))

    rows: dict[str, dict[str, float]] = {}
    started = time.perf_counter()
    for name, folder in [("base (fine-tuned heads)", base), *((f"fine-tuned {task}", path) for task, path in finetuned.items())]:
        result = evaluate_text_zoo(folder, args.zoo, tasks)
        rows[name] = {item.task: item.accuracy for item in result.tasks}
        rows[name]["normalized"] = result.average_normalized_accuracy
        print(f"evaluated {name} ({time.perf_counter() - started:.0f} s)", flush=True)
    for name, settings in CLASSIC_MERGES.items():
        output = work / name.replace(" ", "-")
        recipe = parse_recipe({"base_model": str(base), "models": [{"model": str(m)} for m in finetuned.values()], **settings})
        run_recipe(recipe, MergeOptions(output=output, force=True))
        result = evaluate_text_zoo(output, args.zoo, tasks)
        rows[name] = {item.task: item.accuracy for item in result.tasks}
        rows[name]["normalized"] = result.average_normalized_accuracy
        print(f"evaluated {name} ({time.perf_counter() - started:.0f} s)", flush=True)

    print()
    print("| model | " + " | ".join(tasks) + " | normalized |")
    print("|---|" + "---|" * (len(tasks) + 1))
    for name, values in rows.items():
        cells = [f"**{values[t]:.3f}**" if name == f"fine-tuned {t}" else f"{values[t]:.3f}" for t in tasks]
        print(f"| {name} | " + " | ".join(cells) + f" | {values['normalized']:.3f} |")
    if args.json:
        args.json.write_text(json.dumps({"zoo": str(args.zoo), "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
