"""`merge mass`: build a MASS artifact (shared TSV-M model, task subspaces, router, heads)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from mergekit_ext.cli.main import GlobalOptions
from mergekit_ext.cli.options import GreedyCommand
from mergekit_ext.cli.progress import progress_callback


@click.command(cls=GreedyCommand)
@click.option("--base", required=True, type=click.Path(exists=True), help="Base (pretrained) checkpoint folder.")
@click.option("--models", multiple=True, required=True, type=click.Path(exists=True), help="Fine-tuned checkpoint folders, one per task.")
@click.option("--heads", multiple=True, type=click.Path(exists=True), help="Cosine head files, one per model, in the same order.")
@click.option("--task-names", multiple=True, help="Task names, one per model (default: the model folder names).")
@click.option("--output", "-o", required=True, type=click.Path(file_okay=False), help="Output artifact folder.")
@click.option("--force", is_flag=True, help="Replace the output folder if it exists and is not empty.")
@click.option("--rank", type=int, default=None, help="Per-task rank of every 2-D tensor [default: ⌊min(m, n) / tasks⌋].")
@click.option("--rank-fraction", type=float, default=None, help="Per-task rank as a fraction of min(m, n), in (0, 1].")
@click.option("--svd", "svd_method", type=click.Choice(["full", "randomized"]), default="full", show_default=True, help="SVD algorithm for the per-task truncation.")
@click.option("--redundancy-filter", "redundancy_epsilon", type=float, default=None, help="Leave a task out of the shared model's tensor when its cosine with a kept task exceeds this value (MASS uses 0.3); off by default.")
@click.option("--router-layer", type=int, default=None, help="Block whose first MLP linear input routes [default: ⌊0.75·blocks⌋].")
@click.option(
    "--router-rank",
    type=int,
    default=None,
    help="Route on each task's top N singular vectors instead of all k (not part of MASS as published) [default: all k].",
)
@click.option(
    "--token-rule",
    type=click.Choice(["cls", "mean", "content"]),
    default=None,
    help="Router token rule: the first token, the mean of non-padding tokens, or the mean of tokens that are "
    "neither padding nor special ([CLS], [SEP]) [default: cls for images, mean for text].",
)
@click.option("--threshold", type=float, default=0.2, show_default=True, help="Routing weight a task must exceed to be selected.")
@click.option("--top-k", type=int, default=3, show_default=True, help="Most tasks selected per sample.")
@click.option("--temperature", type=float, default=1.0, show_default=True, help="Softmax temperature of the routing weights.")
@click.option("--mode", type=click.Choice(["topk", "top1"]), default="topk", show_default=True, help="Task selection rule.")
@click.option(
    "--reuse-prefix",
    is_flag=True,
    help="Inference default: run only the blocks from the router block on with the merged weights, continuing "
    "from the shared model's activations (faster; not part of MASS as published).",
)
@click.pass_obj
def mass_command(
    global_options: GlobalOptions,
    base: str,
    models: tuple[str, ...],
    heads: tuple[str, ...],
    task_names: tuple[str, ...],
    output: str,
    force: bool,
    **options: object,
) -> None:
    """Build a MASS artifact and print its size against one model."""
    from mergekit_ext.mass.build import MassBuildOptions, build_mass_artifact

    build_options = MassBuildOptions(seed=global_options.seed, device=global_options.device, force=force, **options)  # type: ignore[arg-type]
    with progress_callback("Building MASS artifact") as update:
        result = build_mass_artifact(
            Path(base), [Path(m) for m in models], Path(output),
            task_names=task_names or None, heads=[Path(h) for h in heads] or None,
            options=build_options, progress=lambda name, done, total: update(done, total, name),
        )  # fmt: skip
    storage = result.config.storage
    click.echo(f"Wrote {result.output} ({len(result.config.task_names)} tasks, router {result.config.router.site})")
    click.echo(
        f"Size: {storage.total_bytes / 1e6:.1f} MB = shared model {storage.shared_bytes / 1e6:.1f} MB + "
        f"factors {storage.factor_bytes / 1e6:.1f} MB + heads {storage.head_bytes / 1e6:.2f} MB; "
        f"storage factor {storage.storage_factor:.2f}x one model ({storage.one_model_bytes / 1e6:.1f} MB)"
    )


def evaluate_mass_artifact(
    artifact: Path,
    zoo_dir: Path,
    tasks: list[str],
    oracle_head: bool,
    batch_routing: bool,
    device: str,
    batch_size: int,
    json_path: Path | None,
    router: dict[str, Any] | None = None,
) -> None:
    """Evaluate a MASS artifact on a text zoo and print accuracy and routing accuracy (used by `merge eval`).

    `router` overrides the artifact's router settings (mode, router_layer, router_rank, token_rule).
    """
    import json

    from rich.console import Console
    from rich.table import Table

    from mergekit_ext.cli.zoo_commands import RichStageProgress, stage_progress
    from mergekit_ext.mass.evaluation import evaluate_mass_text_zoo

    with stage_progress() as progress:
        result = evaluate_mass_text_zoo(
            artifact, zoo_dir, oracle_head=oracle_head, batch_routing=batch_routing, device=device,
            batch_size=batch_size, tasks=tasks or None, progress=RichStageProgress(progress), **(router or {}),
        )  # fmt: skip

    mode = "oracle head" if oracle_head else "task unknown"
    routing = "per batch" if batch_routing else "per text"
    settings = result.settings
    router = f"block {settings['router_layer']}, {settings['token_rule']} tokens, {settings['mode']}"
    if settings["router_rank"] is not None:
        router += f", router rank {settings['router_rank']}"
    table = Table(title=f"MASS {artifact} on {zoo_dir} ({mode}, routing {routing}: {router})")
    table.add_column("task")
    for column in ("test", "accuracy", "fine-tuned", "normalized", "routed top-1"):
        table.add_column(column, justify="right")
    for item in result.accuracy.tasks:
        table.add_row(
            item.task, str(item.test_size), f"{item.accuracy:.3f}", f"{item.finetuned_accuracy:.3f}",
            f"{item.normalized_accuracy:.3f}", f"{result.routing.per_task_top1[item.task]:.3f}",
        )  # fmt: skip
    table.add_row(
        "average", "", f"{result.accuracy.average_accuracy:.3f}", "",
        f"{result.accuracy.average_normalized_accuracy:.3f}", f"{result.routing.top1_accuracy:.3f}", end_section=True,
    )  # fmt: skip
    Console().print(table)
    click.echo(
        f"Routing: top-1 accuracy {result.routing.top1_accuracy:.3f}, own task in the selected set "
        f"{result.routing.coverage:.3f}, mean set size {result.routing.mean_set_size:.2f}"
    )
    if json_path is not None:
        json_path.write_text(json.dumps(result.to_dict(), indent=2), encoding="utf-8")
