"""`merge inspect`: list a checkpoint's tensors from its headers, without loading weights."""

from __future__ import annotations

import click
from rich.console import Console
from rich.table import Table


@click.command("inspect")
@click.argument("path", type=click.Path())
@click.option("--allow-pickle", is_flag=True, help="Allow pickled .bin/.pt files (loaded with weights_only=True).")
@click.option("--limit", default=50, show_default=True, type=int, help="Rows to show (0: all).")
def inspect_command(path: str, allow_pickle: bool, limit: int) -> None:
    """Show the tensors, shapes, dtypes and total size of the checkpoint at PATH."""
    from mergekit_ext.checkpoint import Checkpoint

    checkpoint = Checkpoint.open(path, allow_pickle=allow_pickle)
    table = Table(title=f"{checkpoint.path} ({len(checkpoint)} tensors, {checkpoint.total_bytes / 1e6:.1f} MB)")
    for column in ("tensor", "shape", "dtype", "file"):
        table.add_column(column)
    names = checkpoint.names if limit <= 0 else checkpoint.names[:limit]
    for name in names:
        info = checkpoint.info(name)
        table.add_row(name, str(list(info.shape)), str(info.dtype).removeprefix("torch."), info.file.name)
    Console().print(table)
    if limit > 0 and len(checkpoint) > limit:
        click.echo(f"... {len(checkpoint) - limit} more tensors (use --limit 0 to list all)")
