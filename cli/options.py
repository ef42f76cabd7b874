"""Shared Click pieces: options that take several values after one flag, common merge options."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click


class GreedyCommand(click.Command):
    """A command whose `multiple` options named in `greedy_parameters` take every value up to the next option.

    `--models a b c` becomes `--models a --models b --models c` before Click parses it, so
    the option is declared with `multiple=True` and may also be repeated.
    """

    greedy_parameters: tuple[str, ...] = ("models", "weights", "density", "heads", "task_names")

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        greedy_flags = {
            flag
            for parameter in self.params
            if isinstance(parameter, click.Option) and parameter.multiple and parameter.name in self.greedy_parameters
            for flag in parameter.opts
        }
        expanded: list[str] = []
        active: str | None = None
        for arg in args:
            if arg in greedy_flags:
                active = arg
                continue
            if arg.startswith("-") and not _is_number(arg):
                active = None
                expanded.append(arg)
                continue
            if active is not None:
                expanded.extend([active, arg])
            else:
                expanded.append(arg)
        return super().parse_args(ctx, expanded)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def output_options(function: Callable[..., Any]) -> Callable[..., Any]:
    """Add the options every command that writes a checkpoint shares."""
    decorators = [
        click.option("--output", "-o", required=True, type=click.Path(file_okay=False), help="Output folder."),
        click.option("--force", is_flag=True, help="Replace the output folder if it exists and is not empty."),
        click.option(
            "--shard-size", default="5GB", show_default=True, help="Largest shard file, e.g. 5GB, 500MB or bytes."
        ),
        click.option(
            "--dtype",
            type=click.Choice(["float32", "bfloat16", "float16"]),
            default=None,
            help="Output dtype (default: the base model's dtype). Math is always float32.",
        ),
        click.option("--allow-pickle", is_flag=True, help="Allow pickled .bin/.pt inputs (loaded with weights_only=True)."),
        click.option("--truncate-vocab", is_flag=True, help="Cut every vocabulary to the base's size instead of failing."),
        click.option(
            "--tokenizer-from",
            type=click.Path(exists=True, file_okay=False),
            default=None,
            help="Copy tokenizer files from this folder instead of the base model.",
        ),
        click.option(
            "--prefetch", default=16, show_default=True, type=click.IntRange(1, 64), help="Tensors (or row blocks of large tensors) read ahead."
        ),
    ]
    for decorator in reversed(decorators):
        function = decorator(function)
    return function
