"""Rich progress bars for long library loops, exposed as plain callbacks."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from mergekit_ext.cli.logging_setup import STDERR_CONSOLE


@contextmanager
def progress_callback(description: str) -> Iterator[Callable[[int, int, str], None]]:
    """Yield a `(done, total, label)` callback that drives one rich progress bar on stderr.

    The bar appears at the first call, so input checks that fail before any work starts
    print their error alone.
    """
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[label]}", style="dim"),
    )
    progress = Progress(*columns, console=STDERR_CONSOLE, transient=False)
    tasks: list[TaskID] = []

    def update(done: int, total: int, label: str) -> None:
        if not tasks:
            progress.start()
            tasks.append(progress.add_task(description, total=total, label=""))
        progress.update(tasks[0], completed=done, total=total, label=label[-60:])

    try:
        yield update
    except BaseException:
        if tasks:
            # A transient bar is erased on a terminal and never printed to a file or pipe,
            # so the error message is not preceded by a half-full bar. rich's `Progress.stop`
            # would also print an empty line when stderr is not a terminal.
            progress.live.transient = True
            progress.live.stop()
        raise
    if tasks:
        progress.stop()
