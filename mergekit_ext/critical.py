"""Critical sections: steps that an interrupt must not cut in half.

Replacing an output folder takes two renames and a removal. Cut between them, it
leaves the old output under a hidden name, or no output at all. Code that runs such a
step wraps it in `critical_section()`. A signal handler that would raise (as the
`merge` command's handlers do for Ctrl-C and SIGTERM) checks `in_critical_section()`
and, while it is True, lets the step finish and acts on the signal afterwards.
Without such a handler, the sections change nothing.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

_lock = threading.Lock()
_depth = 0


@contextmanager
def critical_section() -> Iterator[None]:
    """Mark the enclosed step as one that a signal handler should let finish."""
    global _depth
    with _lock:
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1


def in_critical_section() -> bool:
    """Return True while any thread runs inside `critical_section()`."""
    return _depth > 0
