"""mergekit-ext: model merging and model surgery on safetensors checkpoints."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("mergekit-ext")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+source"

__all__ = ["__version__"]
