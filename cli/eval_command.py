"""`merge eval MODEL --zoo text`: per-task test accuracy of a checkpoint on a zoo."""

from __future__ import annotations

import json
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from mergekit_ext.cli.main import GlobalOptions
from mergekit_ext.cli.zoo_commands import RichStageProgress, stage_progress
from mergekit_ext.zoo.evaluate import EVAL_BATCH_SIZE

console = Console()


@click.command("eval")
@click.argument("model", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--zoo", "zoo_name", type=click.Choice(["text"]), default="text", show_default=True, help="Zoo whose test splits and heads to use."
)
@click.option("--small", is_flag=True, help="Use the small zoo built by `merge zoo build text --small`.")
@click.option(
    "--zoo-dir",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Zoo folder; default: the cached zoo of that name.",
)
@click.option("--tasks", multiple=True, help="Task names to evaluate (repeat or comma-separate); default: all.")
@click.option(
    "--unknown-task",
    is_flag=True,
    help="Do not tell the model the task: apply every head and keep the one with the largest max logit.",
)
@click.option(
    "--oracle-head",
    is_flag=True,
    help="MASS artifacts: score each text with its own task's head (the router still picks the weights).",
)
@click.option(
    "--batch-routing",
    is_flag=True,
    help="MASS artifacts: pick one task set per batch from the mean routing weights, not one per text.",
)
@click.option("--mode", type=click.Choice(["topk", "top1"]), default=None, help="MASS artifacts: task selection rule [default: the artifact's].")
@click.option("--router-layer", type=int, default=None, help="MASS artifacts: block whose first MLP linear input routes [default: the artifact's].")
@click.option("--router-rank", type=int, default=None, help="MASS artifacts: route on each task's top N singular vectors [default: the artifact's].")
@click.option(
    "--token-rule",
    type=click.Choice(["cls", "mean", "content"]),
    default=None,
    help="MASS artifacts: router token rule [default: the artifact's].",
)
@click.option("--batch-size", default=EVAL_BATCH_SIZE, show_default=True, type=int, help="Texts per forward pass.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), help="Also write the result as JSON.")
@click.pass_obj
def eval_command(
    options: GlobalOptions,
    model: Path,
    zoo_name: str,
    small: bool,
    zoo_dir: Path | None,
    tasks: tuple[str, ...],
    unknown_task: bool,
    oracle_head: bool,
    batch_routing: bool,
    mode: str | None,
    router_layer: int | None,
    router_rank: int | None,
    token_rule: str | None,
    batch_size: int,
    json_path: Path | None,
) -> None:
    """Report test accuracy of MODEL (a Hugging Face encoder folder or a MASS artifact) with task heads.

    A MASS artifact always runs with the task unknown, unless --oracle-head is given.
    """
    from mergekit_ext.mass.config import CONFIG_NAME
    from mergekit_ext.models.encoder import resolve_device
    from mergekit_ext.zoo.evaluate import evaluate_text_zoo
    from mergekit_ext.zoo.text import default_zoo_dir

    folder = zoo_dir if zoo_dir is not None else default_zoo_dir(small)
    names = [name for value in tasks for name in value.split(",") if name]
    router = {"mode": mode, "router_layer": router_layer, "router_rank": router_rank, "token_rule": token_rule}
    if (model / CONFIG_NAME).is_file():
        from mergekit_ext.cli.mass_command import evaluate_mass_artifact

        evaluate_mass_artifact(
            model, folder, names, oracle_head, batch_routing, str(resolve_device(options.device)), batch_size, json_path, router
        )
        return
    router_options = [f"--{name.replace('_', '-')}" for name, value in router.items() if value is not None]
    if router_options:
        raise click.UsageError(f"{model} is not a MASS artifact (no mass_config.json), so {', '.join(router_options)} cannot be used")
    with stage_progress() as progress:
        result = evaluate_text_zoo(
            model,
            folder,
            tasks=names or None,
            unknown_task=unknown_task,
            device=str(resolve_device(options.device)),
            batch_size=batch_size,
            progress=RichStageProgress(progress),
        )

    mode = "task unknown" if unknown_task else "task known"
    table = Table(title=f"{model} on the {zoo_name} zoo ({mode})")
    table.add_column("task")
    for column in ("test", "accuracy", "fine-tuned", "normalized"):
        table.add_column(column, justify="right")
    if unknown_task:
        table.add_column("right head", justify="right")
    for item in result.tasks:
        row = [
            item.task,
            str(item.test_size),
            f"{item.accuracy:.3f}",
            f"{item.finetuned_accuracy:.3f}",
            f"{item.normalized_accuracy:.3f}",
        ]
        if unknown_task:
            row.append(f"{item.task_choice_accuracy:.3f}")
        table.add_row(*row)
    table.add_row(
        "average", "", f"{result.average_accuracy:.3f}", "", f"{result.average_normalized_accuracy:.3f}",
        end_section=True,
    )  # fmt: skip
    console.print(table)
    if json_path is not None:
        json_path.write_text(json.dumps(result.to_dict(), indent=2), encoding="utf-8")
