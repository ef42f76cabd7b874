"""Exception types for errors a user can fix.

The CLI prints the message of any `MergekitExtError` as one line and exits with
status 2. Every message names the file, tensor or option at fault and the fix.
"""

from __future__ import annotations


class MergekitExtError(Exception):
    """Base class of every error caused by user input or the environment."""


class CheckpointError(MergekitExtError):
    """A checkpoint folder or file is missing, malformed or inconsistent."""


class IncompatibleModelsError(MergekitExtError):
    """Input models disagree: missing tensors, shapes or vocabulary sizes."""


class InvalidTensorError(MergekitExtError):
    """An input tensor holds NaN or Inf values or has an unsupported dtype."""


class OutputError(MergekitExtError):
    """The output folder cannot be written: it exists, is an input, or the disk is full."""


class RecipeError(MergekitExtError):
    """A recipe or a command-line parameter is invalid."""


class PickleNotAllowedError(MergekitExtError):
    """A pickled checkpoint was given without `--allow-pickle`."""
