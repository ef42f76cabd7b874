"""Entry point of the `merge` command.

Commands load lazily so that `merge --help` does not import torch. Each entry of
`COMMANDS` maps a command name to `module:attribute` inside `mergekit_ext.cli`
and a one-line description shown by `--help`.
"""

from __future__ import annotations

import atexit
import importlib
import os
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import FrameType
from typing import Any, NoReturn

import click

from mergekit_ext import __version__
from mergekit_ext.allocator import keep_freed_memory
from mergekit_ext.critical import in_critical_section

# name -> (module inside mergekit_ext.cli, attribute, one-line help)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "run": ("merge_commands", "run_command", "Run a YAML merge recipe (mergekit-compatible subset)."),
    "linear": ("merge_commands", "linear_command", "Weighted average of models."),
    "task-arithmetic": ("merge_commands", "task_arithmetic_command", "Base plus the weighted sum of task vectors."),
    "ties": ("merge_commands", "ties_command", "TIES: trim, elect sign, disjoint merge of task vectors."),
    "dare-ties": ("merge_commands", "dare_ties_command", "DARE random drop with L1 rescale, then TIES sign consensus."),
    "dare-linear": ("merge_commands", "dare_linear_command", "DARE random drop with L1 rescale, then a weighted sum."),
    "slerp": ("merge_commands", "slerp_command", "Spherical interpolation between the base and one model."),
    "tsv": ("merge_commands", "tsv_command", "TSV-M: task singular vectors with orthogonalized bases."),
    "iso-c": ("merge_commands", "iso_c_command", "Iso-C: isotropic spectrum of the summed task vectors."),
    "iso-cts": ("merge_commands", "iso_cts_command", "Iso-CTS: common and task-specific isotropic subspaces."),
    "demo": ("demo_command", "demo_command", "Compare task arithmetic, TIES, TSV-M and MASS on the text zoo."),
    "mass": ("mass_command", "mass_command", "MASS: shared TSV-M model plus task subspaces and a data-free router."),
    "inspect": ("inspect_command", "inspect_command", "Show tensors, shapes, dtypes and sizes of a checkpoint."),
    "evo": ("evo_commands", "evo_group", "Evolutionary merge search of accuracy against generated length (Evo-L2S)."),
    "zoo": ("zoo_commands", "zoo_group", "Build the offline model zoos (text, reasoning, chat) into the cache."),
    "eval": ("eval_command", "eval_command", "Per-task test accuracy of a checkpoint on a model zoo."),
    "steer": ("steer_commands", "steer_group", "Steering vectors: extract, apply, refusal direction, orthogonalize, abliterate, audit."),
    "push": ("push_command", "push_command", "Upload an output folder with its model card to the Hugging Face Hub."),
}


@dataclass
class GlobalOptions:
    """Options given before the command name, shared by every command."""

    device: str
    seed: int
    debug: bool


class LazyGroup(click.Group):
    """A Click group that imports a command's module only when it runs."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        # Method names as recipes spell them (task_arithmetic) work as command names too.
        cmd_name = cmd_name.replace("_", "-")
        if cmd_name not in COMMANDS:
            return None
        module_name, attribute, _ = COMMANDS[cmd_name]
        module = importlib.import_module(f"mergekit_ext.cli.{module_name}")
        return getattr(module, attribute)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, COMMANDS[name][2]) for name in self.list_commands(ctx)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)

    def invoke(self, ctx: click.Context) -> Any:
        from mergekit_ext.errors import MergekitExtError

        try:
            return super().invoke(ctx)
        except MergekitExtError as error:
            options = ctx.find_object(GlobalOptions)
            if options is not None and options.debug:
                raise
            click.echo(f"Error: {error}", err=True)
            ctx.exit(2)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="mergekit-ext")
@click.option(
    "--device",
    default="auto",
    show_default=True,
    help="Compute device: auto (CUDA when present), cpu, cuda or cuda:N.",
)
@click.option("--seed", default=0, show_default=True, type=int, help="Random seed for random methods and sampling.")
@click.option(
    "--log-level",
    default="info",
    show_default=True,
    type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False),
    help="Logging verbosity.",
)
@click.option("--debug", is_flag=True, help="Show full tracebacks for errors.")
@click.pass_context
def cli(ctx: click.Context, device: str, seed: int, log_level: str, debug: bool) -> None:
    """Merge, inspect and operate on safetensors checkpoints."""
    from mergekit_ext.cli.logging_setup import install_rich_logging

    install_rich_logging(log_level)
    ctx.obj = GlobalOptions(device=device, seed=seed, debug=debug)


def main() -> None:
    """Run the CLI; used by the `merge` console script."""
    # SIGTERM (a killed job, a CI timeout) becomes SystemExit, so the writer's context
    # manager removes its temporary folder exactly as it does for Ctrl-C.
    signal.signal(signal.SIGTERM, _exit_on_signal)
    signal.signal(signal.SIGINT, _interrupt)
    # A merge frees and allocates tensors of the same sizes all along, so keep freed memory
    # for reuse (see mergekit_ext.allocator). The setting covers this whole process, which the CLI owns.
    keep_freed_memory()
    try:
        status = cli.main(prog_name="merge", standalone_mode=False)
    except SystemExit:
        if _terminated:
            _echo_stop_message(signal.SIGTERM)
        raise
    except click.exceptions.Abort as error:
        click.echo("Aborted.", err=True)
        # Ctrl-C exits with 128 + SIGINT, as shells report it, and other aborts (a declined prompt) with 1.
        sys.exit(128 + signal.SIGINT if isinstance(error.__cause__, KeyboardInterrupt) else 1)
    except click.ClickException as error:
        click.echo(_one_line_usage_error(error), err=True)
        sys.exit(error.exit_code)
    # The command has finished: a signal from here on would only turn its result into a traceback.
    _ignore_further_signals()
    code = status if isinstance(status, int) else 0
    if _skip_teardown:
        _exit_without_teardown(code)
    sys.exit(code)


# Set by a command whose work is done and whose files are closed (see `skip_teardown`).
_skip_teardown = False


def skip_teardown() -> None:
    """Let `main` end the process without tearing down the interpreter once the command returns.

    Call it only after every file the command wrote is closed. Freeing every object of
    torch and numba at exit took 0.5 to 0.6 s (measured) after a 6 s task arithmetic merge on
    the 2-core development VM.
    """
    global _skip_teardown
    _skip_teardown = True


def _exit_without_teardown(code: int) -> NoReturn:
    # The exit handlers still run (logging flushes its handlers there), and the output
    # streams are flushed, so only the teardown of modules and objects is skipped.
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        # A stream is None when the caller closed it (`>&-`), and a flush fails when the
        # reader of a pipe has gone. The output is committed either way.
        if stream is None:
            continue
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def _one_line_usage_error(error: click.ClickException) -> str:
    """Format a command-line error (a bad option value, a missing argument) as one line."""
    message = error.format_message().replace("\n", " ")
    context = getattr(error, "ctx", None)
    if context is None:
        return f"Error: {message}"
    if isinstance(error, click.NoSuchOption) and context.parent is not None:
        # A global option given after the command name (merge ties --seed 7 ...).
        global_options = {name: parameter for parameter in cli.params for name in parameter.opts}
        parameter = global_options.get(error.option_name)
        if parameter is not None:
            command = context.command_path.split()[-1]
            usage = error.option_name if getattr(parameter, "is_flag", False) else f"{error.option_name} VALUE"
            return (
                f"Error: {error.option_name} is a global option: put it before the command, "
                f"as in 'merge {usage} {command} ...'. See 'merge --help'."
            )
    return f"Error: {message} See '{context.command_path} --help' for the options."


def _exit_on_signal(signal_number: int, frame: FrameType | None) -> None:
    _exit_if_nothing_written(signal_number)
    if _postpone(signal_number, frame):
        return
    global _terminated
    _terminated = True
    _ignore_further_signals()
    raise SystemExit(128 + signal_number)


def _interrupt(signal_number: int, frame: FrameType | None) -> None:
    _exit_if_nothing_written(signal_number)
    if _postpone(signal_number, frame):
        return
    _ignore_further_signals()
    raise KeyboardInterrupt


# Seconds until a postponed signal is sent again.
SIGNAL_RETRY_SECONDS = 0.05
_signal_retry: threading.Timer | None = None
_exit_at_once = False  # True inside `exit_at_once_on_signal`
_terminated = False  # set by the SIGTERM handler, so that `main` prints its message


@contextmanager
def exit_at_once_on_signal() -> Iterator[None]:
    """Let Ctrl-C or SIGTERM end the process at once inside the block.

    Only for a block before the command has written anything, such as loading the merge
    code. Waiting for that import to end, as `_postpone` otherwise does, took 1.7 to 4.6 s.
    """
    global _exit_at_once
    _exit_at_once = True
    try:
        yield
    finally:
        _exit_at_once = False


def ignore_signals() -> None:
    """Ignore Ctrl-C and SIGTERM from now on, once a command's output is committed.

    Changes nothing unless `main` installed this module's handlers, so a command run
    in-process (by click's test runner, say) leaves its caller's handlers alone.
    """
    if signal.getsignal(signal.SIGINT) is _interrupt or signal.getsignal(signal.SIGTERM) is _exit_on_signal:
        _ignore_further_signals()


def _exit_if_nothing_written(signal_number: int) -> None:
    """End the process at once, with status 128 + `signal_number`, inside `exit_at_once_on_signal`."""
    if _exit_at_once:
        _ignore_further_signals()
        _echo_stop_message(signal_number)
        os._exit(128 + signal_number)


def _postpone(signal_number: int, frame: FrameType | None) -> bool:
    """Return True, and send the signal again shortly, when it must not raise now.

    That is while the main thread imports a module, or while a thread runs a critical
    section (`mergekit_ext.critical`, such as the renames that put an output in place).
    An exception raised inside an import can leave a library half-initialized. torch's
    C++ initialization imports numpy and clears any error from that import, so a Ctrl-C
    there was lost. Of 20 merges interrupted 0.38 to 0.48 s after the start, 2 ran on to
    the end and 10 failed later in numpy with a RecursionError.
    """
    global _signal_retry
    if not (in_critical_section() or _importing(frame)):
        return False
    if _signal_retry is None or not _signal_retry.is_alive():
        _signal_retry = threading.Timer(SIGNAL_RETRY_SECONDS, os.kill, (os.getpid(), signal_number))
        _signal_retry.daemon = True
        _signal_retry.start()
    return True


def _echo_stop_message(signal_number: int) -> None:
    try:
        click.echo("Aborted." if signal_number == signal.SIGINT else "Terminated.", err=True)
    except (OSError, ValueError):  # stderr closed, or its reader gone
        pass


def _importing(frame: FrameType | None) -> bool:
    """Return True when `frame` or a frame that called it runs Python's import machinery."""
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib."):
            return True
        frame = frame.f_back
    return False


def _ignore_further_signals() -> None:
    # After the first signal, a merge waits for its running reads, merges and writes (up
    # to a few seconds) and then removes its partial output. A second Ctrl-C or SIGTERM
    # would cut that wait short, leaving the partial folder while a writer thread still
    # writes to it, or ending the process with torch threads running (std::terminate).
    # SIGKILL still ends the process at once.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


if __name__ == "__main__":
    # Run the main of the imported module, whose state (`skip_teardown`) the commands share.
    from mergekit_ext.cli.main import main as entry_point

    entry_point()
