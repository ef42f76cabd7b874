"""Logging set-up for the CLI: one rich handler on the package logger."""

from __future__ import annotations

import logging

from rich.console import Console
from rich.logging import RichHandler

STDERR_CONSOLE = Console(stderr=True)


def install_rich_logging(level: str) -> None:
    """Send `mergekit_ext` log records to stderr through rich, at `level`."""
    logger = logging.getLogger("mergekit_ext")
    logger.setLevel(level.upper())
    if not any(isinstance(handler, RichHandler) for handler in logger.handlers):
        handler = RichHandler(console=STDERR_CONSOLE, show_path=False, rich_tracebacks=False)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    logger.propagate = False
