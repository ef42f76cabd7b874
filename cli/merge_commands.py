"""`merge run` and one command per merge method (`merge ties --base B --models M1 M2 ...`)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from mergekit_ext.cli.main import GlobalOptions, exit_at_once_on_signal, ignore_signals, skip_teardown
from mergekit_ext.cli.options import GreedyCommand, output_options
from mergekit_ext.cli.progress import progress_callback

if TYPE_CHECKING:
    from mergekit_ext.checkpoint.head_start import HeadStart


def _merge_options(
    global_options: GlobalOptions,
    options: dict[str, Any],
    recipe_path: Path | None = None,
    head_start: HeadStart | None = None,
) -> Any:
    from mergekit_ext.checkpoint import parse_size
    from mergekit_ext.engine import MergeOptions

    return MergeOptions(
        output=Path(options["output"]),
        seed=global_options.seed,
        device=global_options.device,
        shard_size=parse_size(options["shard_size"]),
        force=options["force"],
        allow_pickle=options["allow_pickle"],
        truncate_vocab=options["truncate_vocab"],
        prefetch=options["prefetch"],
        tokenizer_from=Path(options["tokenizer_from"]) if options["tokenizer_from"] else None,
        recipe_path=recipe_path,
        head_start=head_start,
    )


def _run(recipe: Any, global_options: GlobalOptions, options: dict[str, Any], recipe_path: Path | None = None) -> None:
    # numpy and scipy (which numba loads) each start an OpenBLAS thread per core, and their
    # waiting loops took 1.6% of the CPU time of a profiled TIES merge. Merges use torch's
    # BLAS, not theirs, so one thread is enough. OpenBLAS reads this when it loads.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    # The disk reads the first tensors while torch and the merge code load (about 1.2 s on
    # the 2-core benchmark machine). Imported here, as `merge --help` needs none of it.
    from mergekit_ext.checkpoint.head_start import HeadStart
    from mergekit_ext.checkpoint.output_folder import check_output_folder
    from mergekit_ext.errors import OutputError

    references = recipe.model_paths()
    if recipe.base_model:
        references.insert(0, recipe.base_model)  # the base comes first: its tensor order is the merge's
    inputs = [Path(reference).expanduser() for reference in references]
    head_start = None
    try:
        # The engine makes the same check after the import. A rejected output needs no head start.
        check_output_folder(Path(options["output"]), [path for path in inputs if path.exists()], options["force"])
        head_start = HeadStart.begin(inputs)
    except OutputError:
        pass
    try:
        # Nothing is written before the merge code has loaded, so a signal may end the process at once.
        with exit_at_once_on_signal():
            from mergekit_ext.engine import run_recipe

        merge_options = _merge_options(global_options, options, recipe_path, head_start)
        with progress_callback(f"{recipe.merge_method} merge") as update:
            report = run_recipe(recipe, merge_options, progress=update)
        # The output is in place: a signal now would report an abort that did not happen.
        ignore_signals()
    finally:
        if head_start is not None:
            head_start.close()
    click.echo(report.summary())
    # The output is committed and its files are closed, so the process may end at once.
    skip_teardown()


@click.command("run", cls=GreedyCommand)
@click.argument("recipe_path", type=click.Path(dir_okay=False))
@output_options
@click.pass_obj
def run_command(global_options: GlobalOptions, recipe_path: str, **options: Any) -> None:
    """Run the YAML recipe RECIPE_PATH (merge_method, base_model, models, parameters)."""
    from mergekit_ext.recipe import load_recipe

    recipe = load_recipe(recipe_path)
    if options["dtype"]:
        recipe = recipe.model_copy(update={"out_dtype": options["dtype"]})
    _run(recipe, global_options, options, Path(recipe_path))


@dataclass(frozen=True)
class MethodOption:
    """A command-line option that sets one method parameter."""

    flag: str
    parameter: str
    per_model: bool
    help: str
    kind: str = "float"  # "float" or "flag"


WEIGHTS = MethodOption("--weights", "weight", True, "Weight per model (one value for all, or one per model).")
DENSITY = MethodOption("--density", "density", True, "Fraction of each task vector kept (one value or one per model).")
LAMBDA = MethodOption("--lambda", "lambda", False, "Scale of the merged task vector.")
NORMALIZE = MethodOption("--normalize/--no-normalize", "normalize", False, "Divide by the sum of weights.", "flag")
ALPHA = MethodOption("--alpha", "alpha", False, "Scale of the merged task vector (TSV-M and Iso).")


def _make_method_command(command_name: str, method: str, requires_base: bool, method_options: list[MethodOption], summary: str) -> click.Command:
    def callback(global_options: GlobalOptions, base: str | None, models: tuple[str, ...], **options: Any) -> None:
        from mergekit_ext.recipe import parse_recipe

        values = {option.parameter: options.pop(_option_key(option)) for option in method_options}
        recipe = parse_recipe(_recipe_data(method, base, models, values, method_options, options["dtype"]), source="command line")
        _run(recipe, global_options, options)

    callback.__doc__ = summary
    command: Any = click.pass_obj(callback)
    for option in reversed(method_options):
        command = _click_option(option)(command)
    command = output_options(command)
    command = click.option(
        "--models",
        "-m",
        multiple=True,
        required=True,
        type=click.Path(exists=True),
        help="Model folders or .safetensors files; several paths may follow one flag.",
    )(command)
    command = click.option(
        "--base",
        "-b",
        required=requires_base,
        type=click.Path(exists=True),
        help="Base model folder (task vectors are taken against it)." if requires_base else "Optional base model.",
    )(command)
    built = click.command(command_name, cls=MethodCommand, help=summary)(command)
    built.method = method
    built.method_options = tuple(method_options)
    return built


class MethodCommand(GreedyCommand):
    """A per-method command whose help shows the method's parameter defaults.

    The defaults live with the methods, which import torch, so they are looked up only
    when the help is shown, and `merge --help` stays fast.
    """

    method: str = ""
    method_options: tuple[MethodOption, ...] = ()

    def format_help(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """Add each method option's default to its help text, then format the help."""
        from mergekit_ext.methods import get_method

        specs = {spec.name: spec for spec in get_method(self.method).parameters}
        keys = {_option_key(option): option for option in self.method_options}
        for parameter in self.params:
            option = keys.get(parameter.name or "")
            spec = specs.get(option.parameter) if option is not None else None
            if not isinstance(parameter, click.Option) or spec is None or parameter.help is None:
                continue
            if "Default:" not in parameter.help:
                parameter.help = f"{parameter.help} Default: {_default_text(spec)}."
        super().format_help(ctx, formatter)


def _default_text(spec: Any) -> str:
    if spec.default is None:
        return "none, required"
    if spec.is_flag:
        return "on" if spec.default else "off"
    return f"{spec.default:g}"


def _option_key(option: MethodOption) -> str:
    return option.flag.split("/")[0].lstrip("-").replace("-", "_")


def _click_option(option: MethodOption) -> Any:
    if option.kind == "flag":
        return click.option(option.flag, _option_key(option), default=None, help=option.help)
    if option.per_model:
        return click.option(option.flag, _option_key(option), multiple=True, type=float, help=option.help)
    return click.option(option.flag, _option_key(option), type=float, default=None, help=option.help)


def _recipe_data(
    method: str,
    base: str | None,
    models: tuple[str, ...],
    values: dict[str, Any],
    method_options: list[MethodOption],
    dtype: str | None,
) -> dict[str, Any]:
    from mergekit_ext.errors import RecipeError

    entries: list[dict[str, Any]] = [{"model": path, "parameters": {}} for path in models]
    parameters: dict[str, Any] = {}
    for option in method_options:
        value = values[option.parameter]
        if value is None or value == ():
            continue
        if not option.per_model:
            parameters[option.parameter] = value
            continue
        if len(value) == 1:
            parameters[option.parameter] = value[0]
        elif len(value) == len(models):
            for entry, item in zip(entries, value):
                entry["parameters"][option.parameter] = item
        else:
            raise RecipeError(
                f"{option.flag} got {len(value)} values for {len(models)} models; give one value or one per model"
            )
    data: dict[str, Any] = {"merge_method": method, "models": entries, "parameters": parameters}
    if base:
        data["base_model"] = base
    if dtype:
        data["out_dtype"] = dtype
    return data


linear_command = _make_method_command(
    "linear", "linear", False, [WEIGHTS, NORMALIZE], "Weighted average of models: sum(w_i x_i) / sum(w_i)."
)
task_arithmetic_command = _make_method_command(
    "task-arithmetic", "task_arithmetic", True, [WEIGHTS, LAMBDA, NORMALIZE], "Base plus lambda times the weighted sum of task vectors."
)
ties_command = _make_method_command(
    "ties", "ties", True, [WEIGHTS, DENSITY, LAMBDA, NORMALIZE], "TIES: keep the top-density entries, elect signs, average agreeing entries."
)
dare_ties_command = _make_method_command(
    "dare-ties", "dare_ties", True, [WEIGHTS, DENSITY, LAMBDA, NORMALIZE], "DARE random drop with L1 rescale, then TIES sign consensus."
)
dare_linear_command = _make_method_command(
    "dare-linear", "dare_linear", True, [WEIGHTS, DENSITY, LAMBDA, NORMALIZE], "DARE random drop with L1 rescale, then a weighted sum."
)
slerp_command = _make_method_command(
    "slerp",
    "slerp",
    True,
    [MethodOption("--t", "t", False, "Interpolation factor: 0 returns the base, 1 the model.")],
    "Spherical interpolation between the base and one model.",
)
tsv_command = _make_method_command(
    "tsv", "tsv", True, [ALPHA], "TSV-M: per-task singular vectors, orthogonalized, summed onto the base."
)
iso_c_command = _make_method_command(
    "iso-c", "iso_c", True, [ALPHA], "Iso-C: SVD of the summed task vectors with a flat spectrum."
)
iso_cts_command = _make_method_command(
    "iso-cts",
    "iso_cts",
    True,
    [ALPHA, MethodOption("--common-space-fraction", "common_space_fraction", False, "Share of the rank kept for the common subspace.")],
    "Iso-CTS: common and task-specific isotropic subspaces.",
)
