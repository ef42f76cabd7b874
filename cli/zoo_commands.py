"""`merge zoo build NAME`: build an offline model zoo into the cache."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from mergekit_ext.cli.main import GlobalOptions
from mergekit_ext.cli.steer_commands import build_chat_for_zoo_command

console = Console()


class RichStageProgress:
    """Adapter from the library's progress(stage, completed, total) callback to one rich bar per stage."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.bars: dict[str, Any] = {}

    def __call__(self, stage: str, completed: int, total: int) -> None:
        if stage not in self.bars:
            self.bars[stage] = self.progress.add_task(stage, total=total)
        self.progress.update(self.bars[stage], completed=completed, total=total)


def stage_progress() -> Progress:
    """Return the rich progress display used by zoo builds and evaluation."""
    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=Console(stderr=True), transient=False,
    )  # fmt: skip


def parse_task_files(values: tuple[str, ...]) -> list[tuple[str, Path]]:
    """Split NAME=PATH values of --task-file."""
    parsed = []
    for value in values:
        name, separator, path = value.partition("=")
        if not separator or not name or not path:
            raise click.BadParameter(f"expected NAME=PATH.jsonl, got {value!r}", param_hint="--task-file")
        parsed.append((name, Path(path)))
    return parsed


def build_text(options: GlobalOptions, arguments: dict[str, Any]) -> tuple[Path, dict[str, Any]]:
    from mergekit_ext.models.encoder import resolve_device
    from mergekit_ext.zoo.text import TextZooSettings, build_text_zoo
    from mergekit_ext.zoo.text_config import load_text_tasks_config, tasks_from_files

    extra = tasks_from_files(parse_task_files(arguments["task_file"]))
    if arguments["config"] is not None:
        extra += load_text_tasks_config(arguments["config"])
    small = arguments["small"]
    settings = TextZooSettings.small(options.seed) if small else TextZooSettings(seed=options.seed)
    if arguments["steps"] is not None:
        settings = dataclasses.replace(settings, steps=arguments["steps"])
    # no --tasks: the built-in tasks (or the small set) plus every user task
    tasks = [name for value in arguments["tasks"] for name in value.split(",") if name]
    device = str(resolve_device(options.device))
    with stage_progress() as progress:
        return build_text_zoo(
            arguments["output"],
            settings=settings,
            tasks=tasks or None,
            extra_tasks=extra,
            small=small,
            device=device,
            force=arguments["force"],
            num_threads=arguments.get("threads"),
            progress=RichStageProgress(progress),
        )


def build_reasoning(options: GlobalOptions, arguments: dict[str, Any]) -> tuple[Path, dict[str, Any]]:
    from mergekit_ext.zoo.reasoning import build_reasoning_zoo, reasoning_manifest

    with stage_progress() as progress:
        folder = build_reasoning_zoo(
            arguments["output"], small=arguments["small"], seed=options.seed, force=arguments["force"],
            num_threads=arguments.get("threads"), progress=RichStageProgress(progress),
        )
    return folder, reasoning_manifest(folder)


def print_reasoning_summary(folder: Path, manifest: dict[str, Any]) -> None:
    """Print accuracy and mean generated tokens of the reasoning zoo models on its test split."""
    table = Table(title=f"reasoning zoo at {folder} (test split, greedy)")
    for column in ("model", "accuracy", "mean tokens", "truncated"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for name, entry in manifest["measured_on_test"].items():
        table.add_row(name, f"{entry['accuracy']:.3f}", f"{entry['mean_tokens']:.1f}", str(entry["truncated"]))
    console.print(table)
    console.print(f"build time {manifest['build_seconds']} s (CPU {manifest['build_cpu_seconds']} s)")


def print_text_summary(folder: Path, manifest: dict[str, Any]) -> None:
    """Print the per-task table of a text zoo manifest."""
    table = Table(title=f"text zoo at {folder}")
    for column in ("task", "classes", "train", "test", "frozen base", "fine-tuned"):
        table.add_column(column, justify="left" if column == "task" else "right")
    for task, entry in manifest["tasks"].items():
        table.add_row(
            task,
            str(entry["classes"]),
            str(entry["train_size"]),
            str(entry["test_size"]),
            f"{entry['frozen_base_accuracy']:.3f}",
            f"{entry['finetuned_accuracy']:.3f}",
        )
    console.print(table)
    console.print(
        f"build time of the listed tasks {manifest['build_seconds']} s (CPU {manifest['build_cpu_seconds']} s); "
        f"this run {manifest['run_seconds']} s, rebuilt: {', '.join(manifest['rebuilt_tasks']) or 'none'}"
    )


# zoo name -> printer of the build summary (zoos without one print only the folder)
SUMMARIES: dict[str, Callable[[Path, dict[str, Any]], None]] = {
    "text": print_text_summary,
    "reasoning": print_reasoning_summary,
}

# zoo name -> builder(options, command arguments) -> (zoo folder, manifest)
BUILDERS: dict[str, Callable[[GlobalOptions, dict[str, Any]], tuple[Path, dict[str, Any]]]] = {
    "text": build_text,
    "chat": build_chat_for_zoo_command,
    "reasoning": build_reasoning,
}


@click.group("zoo")
def zoo_group() -> None:
    """Build the offline model zoos used by demos, tests and benchmarks."""


@zoo_group.command("build")
@click.argument("name", type=click.Choice(sorted(BUILDERS)))
@click.option("--small", is_flag=True, help="Build the test-sized variant (3 tasks, few steps).")
@click.option("--tasks", multiple=True, help="Task names to build (repeat or comma-separate); default: all.")
@click.option(
    "--task-file",
    multiple=True,
    metavar="NAME=PATH",
    help='Add a task from a JSONL file of {"text", "label"} rows (repeatable).',
)
@click.option(
    "--config",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="YAML file with a `tasks:` list of {name, jsonl, max_length, max_per_class}.",
)
@click.option("--steps", type=int, help="Fine-tuning steps per task (overrides the preset).")
@click.option(
    "--output",
    type=click.Path(file_okay=False, path_type=Path),
    help="Zoo folder; default: the user cache (~/.cache/mergekit-ext/zoo/text-1).",
)
@click.option("--force", is_flag=True, help="Rebuild every task even when a cached build matches.")
@click.option("--threads", type=int, help="Torch CPU threads during the build (text, reasoning); default: torch's choice. 1 suits a busy CPU.")
@click.pass_obj
def build_command(options: GlobalOptions, name: str, **arguments: Any) -> None:
    """Build zoo NAME into the cache, reusing tasks whose settings did not change."""
    folder, manifest = BUILDERS[name](options, arguments)
    summary = SUMMARIES.get(name)
    if summary is not None:
        summary(folder, manifest)
    click.echo(json.dumps({"zoo": str(folder)}))
