"""`merge demo`: task arithmetic, TIES, TSV-M and MASS on the text zoo, in one table."""

from __future__ import annotations

from pathlib import Path

import click

from mergekit_ext.cli.main import GlobalOptions


@click.command("demo")
@click.option("--small", is_flag=True, help="Use the small zoo (3 tasks, a few minutes to build).")
@click.option(
    "--zoo-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Zoo folder: used as it is when it contains a finished zoo, else built there [default: the cached zoo].",
)
@click.option(
    "--work-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Folder for the merged models and the MASS artifact [default: the cache folder].",
)
@click.option(
    "--rebuild",
    is_flag=True,
    help="Merge again even when the merged models of an earlier run are current.",
)
@click.pass_obj
def demo_command(options: GlobalOptions, small: bool, zoo_dir: Path | None, work_dir: Path | None, rebuild: bool) -> None:
    """Merge every task of the text zoo four ways and compare them with the task unknown."""
    from rich.console import Console
    from rich.table import Table

    from mergekit_ext.cli.zoo_commands import RichStageProgress, stage_progress
    from mergekit_ext.device import resolve_device
    from mergekit_ext.mass.demo import run_demo

    with stage_progress() as progress:
        report = run_demo(
            small=small, device=str(resolve_device(options.device)), zoo_dir=zoo_dir, work_dir=work_dir, seed=options.seed,
            rebuild=rebuild, progress=RichStageProgress(progress),
        )  # fmt: skip

    table = Table(title=f"Text zoo {report.zoo_dir.name}: test accuracy, task unknown")
    table.add_column("method")
    for task in report.tasks:
        table.add_column(task, justify="right")
    table.add_column("average", justify="right")
    table.add_column("normalized", justify="right")
    table.add_column("routing top-1", justify="right")
    table.add_row("fine-tuned (own task)", *[f"{report.finetuned[t]:.3f}" for t in report.tasks], "", "1.000", "")
    for row in report.rows:
        table.add_row(
            row.method, *[f"{row.per_task[t]:.3f}" for t in report.tasks], f"{row.average:.3f}",
            f"{row.normalized:.3f}", "" if row.routing_top1 is None else f"{row.routing_top1:.3f}",
        )  # fmt: skip
    console = Console()
    if not console.is_terminal:
        # Piped output (a log file, CI) would otherwise be cut to 80 columns.
        console = Console(width=160)
    console.print(table)
    click.echo(f"MASS storage: {report.storage_factor:.2f}x one model")
    click.echo(
        f"MASS latency against one forward pass (same batches, warm cache of {report.distinct_task_sets} "
        f"task sets): {report.latency_ratio:.2f}x two-pass, {report.reuse_prefix_latency_ratio:.2f}x with "
        f"--reuse-prefix (normalized accuracy {report.reuse_prefix_normalized:.3f})"
    )
    reused = [name for name, was_reused in report.reused.items() if was_reused]
    if reused:
        click.echo(f"Reused from an earlier run (inputs, settings and code unchanged): {', '.join(reused)}; --rebuild merges again")
    click.echo(f"Finished in {report.seconds:.0f} s")
