"""Per-tensor merge kernels and the registry the engine and the CLI look them up in.

Methods: linear, task_arithmetic, ties, dare_ties, dare_linear, slerp, tsv
(TSV-M), iso_c and iso_cts. Names accept hyphens in place of underscores
(`task-arithmetic`, `dare-ties`, `iso-cts`).
"""

from __future__ import annotations

from mergekit_ext.errors import RecipeError
from mergekit_ext.methods.base import MergeMethod, ParameterSpec, TensorMergeInput
from mergekit_ext.methods.dare import DARE_LINEAR, DARE_TIES
from mergekit_ext.methods.iso import IsoCMethod, IsoCtsMethod
from mergekit_ext.methods.linear import LinearMethod
from mergekit_ext.methods.slerp import SlerpMethod
from mergekit_ext.methods.task_arithmetic import TaskArithmeticMethod
from mergekit_ext.methods.ties import TiesMethod
from mergekit_ext.methods.tsv import TsvMethod

METHODS: dict[str, MergeMethod] = {
    method.name: method
    for method in (
        LinearMethod(),
        TaskArithmeticMethod(),
        TiesMethod(),
        DARE_TIES,
        DARE_LINEAR,
        SlerpMethod(),
        TsvMethod(),
        IsoCMethod(),
        IsoCtsMethod(),
    )
}

# Other spellings users write for the same method.
_ALIASES: dict[str, str] = {"tsv_m": "tsv"}


def get_method(name: str) -> MergeMethod:
    """Return the merge method registered under name (hyphens read as underscores)."""
    key = name.strip().lower().replace("-", "_")
    key = _ALIASES.get(key, key)
    method = METHODS.get(key)
    if method is None:
        raise RecipeError(
            f"unknown merge method {name!r}. Valid methods: {', '.join(METHODS)}"
        )
    return method


__all__ = ["METHODS", "MergeMethod", "ParameterSpec", "TensorMergeInput", "get_method"]
