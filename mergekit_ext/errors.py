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


class NonFiniteInputError(InvalidTensorError):
    """A method found NaN or Inf in one of its inputs: the base (`model_index` None) or a model."""

    def __init__(self, tensor_name: str, model_index: int | None) -> None:
        self.tensor_name = tensor_name
        self.model_index = model_index
        source = "the base" if model_index is None else f"model {model_index}"
        super().__init__(f"tensor {tensor_name!r} of {source} contains NaN or Inf values")


class TaskVectorOverflowError(InvalidTensorError):
    """A model's task vector (model minus base) overflows float32: `model_index` is its position."""

    def __init__(self, tensor_name: str, model_index: int) -> None:
        self.tensor_name = tensor_name
        self.model_index = model_index
        super().__init__(
            f"tensor {tensor_name!r}: model {model_index} differs from the base by more than float32 "
            "can represent (about 3.4e38)"
        )


class OutputError(MergekitExtError):
    """The output folder cannot be written: it exists, is an input, or the disk is full."""


class RecipeError(MergekitExtError):
    """A recipe or a command-line parameter is invalid."""


class PickleNotAllowedError(MergekitExtError):
    """A pickled checkpoint was given without `--allow-pickle`."""
