"""`merge evo ...`: evolutionary merge search (Evo-L2S) and its tools."""

from __future__ import annotations

import json
from pathlib import Path

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from mergekit_ext.cli.main import GlobalOptions

console = Console()


def _threads_option(function):
    return click.option(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: torch's choice); 1 is often fastest for tiny models on a busy CPU.",
    )(function)


def _set_threads(threads: int | None) -> None:
    if threads is not None:
        import torch

        torch.set_num_threads(threads)


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(), console=Console(stderr=True),
    )  # fmt: skip


@click.group("evo")
def evo_group() -> None:
    """Multi-objective evolutionary merging: accuracy against generated length."""


@evo_group.command("search")
@click.argument("config", required=False, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--output", "output", type=click.Path(file_okay=False, path_type=Path), help="Run folder to create.")
@click.option("--resume", "resume", type=click.Path(file_okay=False, path_type=Path),
              help="Run folder of a killed run to continue (CONFIG is then taken from its run.json).")
@click.option("--force", is_flag=True, help="Overwrite a non-empty run folder.")
@click.option("--backend", "dispatch", type=click.Choice(["in-process", "ray"]), default="in-process",
              show_default=True,
              help="ray: evaluate candidates on Ray actors (one per GPU or CPU slot), each running the "
                   "configuration's backend; needs the dist extra.")
@click.option("--ray-address", help="Ray cluster to join (HOST:PORT or auto); default: start a local one on loopback.")
@click.option("--ray-actors", type=click.IntRange(min=1),
              help="Number of Ray actors (default: one per GPU, or one per CPU without GPUs).")
@_threads_option
@click.pass_obj
def search_command(options: GlobalOptions, config: Path | None, output: Path | None, resume: Path | None,
                   force: bool, dispatch: str, ray_address: str | None, ray_actors: int | None,
                   threads: int | None) -> None:
    """Search merge genomes for the Pareto front of accuracy against mean generated tokens."""
    from mergekit_ext.errors import RecipeError
    from mergekit_ext.evo.ray_cluster import RaySettings
    from mergekit_ext.evo.report import front_table
    from mergekit_ext.evo.runner import run_search

    if (output is None) == (resume is None):
        raise RecipeError("Give exactly one of --output RUN (new run, with CONFIG) or --resume RUN.")
    _set_threads(threads)
    run_dir = resume or output
    with _progress() as progress:
        task = progress.add_task("generation 0", total=None, info="")

        def update(state) -> None:
            progress.update(
                task,
                description=f"generation {state.generation}/{state.generations}",
                completed=state.candidates_done,
                total=state.candidates_total or None,
                info=f"front {state.front_size}, HV {state.hypervolume:.4f}",
            )

        ray_settings = RaySettings(address=ray_address, num_actors=ray_actors) if dispatch == "ray" else None
        run_search(config, run_dir, resume=resume is not None, device=options.device, force=force, progress=update,
                   ray_settings=ray_settings)
    console.print(front_table(run_dir))
    click.echo(json.dumps({"run": str(run_dir)}))


@evo_group.command("subset")
@click.argument("config", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--pool", required=True, help="Pool of candidate problems: benchmark name or JSONL path.")
@click.option("-k", "--size", "k", default=50, show_default=True, help="Number of problems to keep.")
@click.option("--strategy", type=click.Choice(["entropy", "random", "disagreement"]), default="entropy",
              show_default=True, help="Selection rule.")
@click.option("--exclude", multiple=True, help="Evaluation set whose questions leave the pool (repeatable).")
@click.option("--grid-points", default=11, show_default=True, help="Weight grid size (11: w = 0, 0.1, ..., 1).")
@click.option("--output", required=True, type=click.Path(dir_okay=False, path_type=Path), help="Subset JSON file.")
@_threads_option
@click.pass_obj
def subset_command(options: GlobalOptions, config: Path, pool: str, k: int, strategy: str, exclude: tuple[str, ...],
                   grid_points: int, output: Path, threads: int | None) -> None:
    """Evaluate a weight grid on a pool and keep the k most informative problems."""
    from mergekit_ext.evo.runner import run_subset

    _set_threads(threads)
    with _progress() as progress:
        task = progress.add_task("grid", total=grid_points, info="")
        report = run_subset(config, pool, k, strategy, output, list(exclude), grid_points, options.device,
                            options.seed, progress=lambda done, total: progress.update(task, completed=done))
    console.print(
        f"{len(report.ids)} of {report.pool_size} problems ({report.excluded} excluded), strategy {strategy}: "
        f"Spearman accuracy {report.spearman_accuracy:.3f}, length {report.spearman_length:.3f}; "
        f"random subsets {report.random_spearman_accuracy_mean:.3f} ± {report.random_spearman_accuracy_std:.3f}"
    )


@evo_group.command("grid")
@click.argument("config", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--problems", required=True, help="Benchmark name or JSONL path to evaluate on.")
@click.option("--points", default=11, show_default=True, help="Grid size (11: w = 0, 0.1, ..., 1).")
@click.option("--output", type=click.Path(dir_okay=False, path_type=Path), help="Write the table as JSON here.")
@_threads_option
@click.pass_obj
def grid_command(options: GlobalOptions, config: Path, problems: str, points: int, output: Path | None,
                 threads: int | None) -> None:
    """Accuracy and mean length of the global-weight grid on a problem set."""
    from mergekit_ext.evo.config import load_config
    from mergekit_ext.evo.data import load_benchmark
    from mergekit_ext.evo.runner import evaluate_genomes, grid_genomes

    _set_threads(threads)
    loaded = load_config(config)
    genomes = grid_genomes(loaded, points)
    items = load_benchmark(problems)
    with _progress() as progress:
        task = progress.add_task("grid", total=len(genomes), info="")
        results = evaluate_genomes(loaded, genomes, items, options.device,
                                   lambda done, total: progress.update(task, completed=done))
    rows = [{"weight": g.genes[0], "accuracy": r.accuracy, "mean_tokens": r.mean_tokens, "truncated": r.truncated}
            for g, r in zip(genomes, results)]
    for row in rows:
        console.print(f"w={row['weight']:.2f}  accuracy {100 * row['accuracy']:.1f}%  "
                      f"tokens {row['mean_tokens']:.1f}  truncated {row['truncated']}")
    if output is not None:
        output.write_text(json.dumps({"problems": problems, "rows": rows}, indent=2) + "\n", encoding="utf-8")


@evo_group.command("evaluate")
@click.argument("run", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--problems", required=True, help="Benchmark name or JSONL path (for example the zoo's test split).")
@click.option("--limit", type=int, help="Use the first N problems.")
@_threads_option
@click.pass_obj
def evaluate_command(options: GlobalOptions, run: Path, problems: str, limit: int | None, threads: int | None) -> None:
    """Measure the parents and the front members of RUN on other problems (writes test_evaluation.json)."""
    from mergekit_ext.evo.runner import closest_to_target, evaluate_front_on

    _set_threads(threads)
    report = evaluate_front_on(run, problems, options.device, limit)
    for row in report["rows"]:
        console.print(f"{row['name']:<10} genes {row['genes']}  accuracy {100 * row['accuracy']:.1f}%  "
                      f"tokens {row['mean_tokens']:.1f}")
    best = closest_to_target(report)
    if best is not None:
        console.print(f"closest to 'length <= 50% of base at accuracy >= base - 1 point': {best['name']}")


@evo_group.command("export")
@click.argument("run", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--front", "front", is_flag=True, required=True, help="Export every Pareto front member.")
@click.option("--output", type=click.Path(file_okay=False, path_type=Path), help="Folder (default RUN/export).")
@click.option("--dtype", help="Output dtype (default: the base model's).")
@click.option("--force", is_flag=True, help="Overwrite existing member folders.")
@click.option("--push", "push_prefix", metavar="ORG/PREFIX", help="Push every member to the Hugging Face Hub.")
@click.option(
    "--layout",
    type=click.Choice(["repos", "branches"]),
    default="repos",
    show_default=True,
    help="repos: one repo PREFIX-member-ii per member; branches: one repo PREFIX, one branch per member.",
)
@click.option("--private", is_flag=True, help="Create the Hub repos as private.")
@click.option("--dry-run", is_flag=True, help="With --push: list what would be uploaded and send nothing.")
@click.pass_obj
def export_command(options: GlobalOptions, run: Path, front: bool, output: Path | None, dtype: str | None,
                   force: bool, push_prefix: str | None, layout: str, private: bool, dry_run: bool) -> None:
    """Write every front member of RUN as a merged checkpoint with a model card, and optionally push them."""
    from mergekit_ext.evo.export import export_front, push_exported_front

    written = export_front(run, output, dtype=dtype, device=options.device, force=force)
    for path in written:
        console.print(str(path))
    if push_prefix:
        plan = push_exported_front(run, written, push_prefix, layout, private=private, dry_run=dry_run)
        if dry_run:
            console.print(plan.describe())


@evo_group.command("report")
@click.argument("run", type=click.Path(exists=True, file_okay=False, path_type=Path))
def report_command(run: Path) -> None:
    """Print the front table of RUN and save pareto.png."""
    from mergekit_ext.evo.report import front_table, plot_run

    console.print(front_table(run))
    console.print(f"plot: {plot_run(run)}")


@evo_group.command("agreement")
@click.argument("config", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--problems", required=True, help="Benchmark name or JSONL path.")
@click.option("--limit", type=int, default=50, show_default=True, help="Use the first N problems.")
@click.option("--points", default=11, show_default=True, help="Weight grid size of the compared candidates.")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16"]), help="Override the config's dtype.")
@_threads_option
@click.pass_obj
def agreement_command(options: GlobalOptions, config: Path, problems: str, limit: int, points: int,
                      dtype: str | None, threads: int | None) -> None:
    """Greedy-token agreement of the population backend with the sequential backend."""
    from mergekit_ext.evo.config import load_config
    from mergekit_ext.evo.data import load_benchmark
    from mergekit_ext.evo.runner import grid_genomes, measure_agreement

    _set_threads(threads)
    loaded = load_config(config)
    if dtype is not None:
        loaded = loaded.model_copy(update={"dtype": dtype})
    result = measure_agreement(loaded, grid_genomes(loaded, points), load_benchmark(problems, limit=limit),
                               options.device)
    click.echo(json.dumps({key: value for key, value in result.items() if key not in ("sequential", "population")}))
