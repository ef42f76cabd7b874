"""Rich progress bars for long library loops, exposed as plain callbacks."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from mergekit_ext.cli.logging_setup import STDERR_CONSOLE


@contextmanager
def progress_callback(description: str) -> Iterator[Callable[[int, int, str], None]]:
    """Yield a `(done, total, label)` callback that drives one rich progress bar on stderr."""
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[label]}", style="dim"),
    )
    with Progress(*columns, console=STDERR_CONSOLE, transient=False) as progress:
        task = progress.add_task(description, total=None, label="")

        def update(done: int, total: int, label: str) -> None:
            progress.update(task, completed=done, total=total, label=label[-60:])

        yield update
