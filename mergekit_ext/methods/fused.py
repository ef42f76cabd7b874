"""Fused CPU kernels for TIES and task arithmetic, compiled with numba.

A torch operation makes one pass over memory, so the TIES selection and sign
election cost a dozen passes per model and entry. These kernels make one pass per
step instead: for TIES a selection pass per model (|model - base|, counting and
collecting the entries near the cut) and one merge pass over all models, and for
task arithmetic one merge pass. The selection pass works on chunks of 2048 entries
held in the CPU caches. The merge passes take each entry of all models at once and
keep every sum in a register, converting bf16 inputs as they go.

The arithmetic is the torch path's, operation by operation in float32. numba does
not fuse multiplies and adds unless asked, so both paths give the same result to
the bit, and tests compare them. The kernels take CPU tensors of one dtype, bf16 or
float32. Anything else (CUDA, float16, mixed dtypes), or numba missing, or the
environment variable MERGEKIT_EXT_KERNELS=torch, keeps the torch path.

Tensors of at least PARALLEL_MIN_ELEMENTS entries are split among the CPU cores:
the models' selection passes run side by side, and the merge pass in one part per
core. Measured on the development machine with 2 cores: on the 136M-entry embedding
table of Qwen2-0.5B (4 bf16 models, density 0.5), TIES took 0.8 to 1.6 s with these
kernels and 4.4 to 4.6 s on the torch path. Both ran twice, with identical outputs.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from types import ModuleType
from typing import Any, TypeVar

import numpy as np
import torch

KERNELS_ENV = "MERGEKIT_EXT_KERNELS"
T = TypeVar("T")
# Entries converted and processed at a time: the chunk's float32 temporaries of a few
# models stay in the first- and second-level caches.
CHUNK = 2048
# Smaller tensors keep the torch path, so merges of small models never load numba.
# Loading it and its cached kernels costs about a second per process: a merge of
# 5.5M entries in all ran about 1 s slower end to end with the kernels. From here on
# the kernels win: TIES of the 114688-entry key projection of Qwen2-0.5B (4 bf16
# models) took 2.7 ms with them and 12.6 ms on the torch path.
MIN_ELEMENTS = 1 << 16
# Tensors at least this large are split among the CPU cores. Below it, starting the
# threads costs more than they save (an estimate, not measured).
PARALLEL_MIN_ELEMENTS = 1 << 20
# Entries examined at once when collecting those inside the band: groups without
# any are skipped after a count that vectorizes.
GROUP = 64


@dataclass(frozen=True)
class Band:
    """The result of a selection pass.

    `above` counts the entries above the band. `values` and `positions` contain the band's
    other entries in flat order, and `ties` counts those equal to the tie value, whose
    count in each chunk of CHUNK entries is in `chunk_ties`. `non_finite` counts the
    magnitudes that are NaN or infinite: where an input entry is, or where a difference
    of finite entries overflowed.
    """

    above: int
    values: torch.Tensor
    positions: torch.Tensor
    ties: int
    chunk_ties: torch.Tensor
    non_finite: int = 0


@dataclass(frozen=True)
class KeepRule:
    """The task vector entries a model keeps: |delta| above `threshold`, or above `tie_threshold` before `tie_end`."""

    threshold: float
    tie_threshold: float
    tie_end: int

    @staticmethod
    def keep_all() -> KeepRule:
        """Keep every entry (no trimming)."""
        return KeepRule(-1.0, -1.0, 0)


def enabled() -> bool:
    """Return True when the fused kernels can run: numba imports and MERGEKIT_EXT_KERNELS is not 'torch'."""
    if os.environ.get(KERNELS_ENV, "").strip().lower() == "torch":
        return False
    return _compiled() is not None


def loaded() -> bool:
    """Return True when the kernels are already loaded in this process, without loading them."""
    return _compiled.cache_info().currsize > 0 and _compiled() is not None


def accepts(tensors: Sequence[torch.Tensor]) -> bool:
    """Return True when the fused kernels take these flat tensors.

    They take MIN_ELEMENTS entries or more, on CPU, contiguous, all of one dtype (bf16
    or float32).
    """
    if not tensors or tensors[0].numel() < MIN_ELEMENTS or not enabled():
        return False
    dtype = tensors[0].dtype
    return dtype in (torch.bfloat16, torch.float32) and all(
        t.device.type == "cpu" and t.dtype == dtype and t.dim() == 1 and t.is_contiguous() for t in tensors
    )


def magnitudes_at(model: torch.Tensor, base: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Return |model - base| at the flat `positions` (int64) in float32, as torch computes it."""
    output = torch.empty(positions.numel(), dtype=torch.float32)
    _require().magnitudes_at(_bits(model), _bits(base), positions.numpy(), output.numpy())
    return output


def all_finite(tensor: torch.Tensor) -> bool:
    """Return True when a flat tensor that `accepts` takes has no NaN or infinite entry.

    One pass over the bit patterns: on the 4.36M-entry bf16 weights of Qwen2-0.5B,
    0.22 ms against 0.48 ms for torch.aminmax.
    """
    return bool(_require().all_finite(_bits(tensor), _shift(tensor)))


def band(
    model: torch.Tensor, base: torch.Tensor, low: float, high: float, capacity: int, tie: float = -1.0
) -> Band:
    """Count |model - base| above `high`, and collect the entries in [low, high] with their positions.

    Entries equal to `tie` are counted, not collected. bf16 task vectors often put a
    few percent of their entries on the one value where the cut falls, and collecting
    them was most of the pass's time. The default, -1, matches no magnitude.
    `capacity` is the expected number of collected entries. When more fall inside,
    a second pass collects them into buffers of the counted size. The pass also counts
    the magnitudes that are NaN or infinite, so a caller needs no separate check of
    the inputs while they are finite.
    """
    kernels = _require()
    chunk_ties = torch.empty(-(-model.numel() // CHUNK), dtype=torch.int64)
    while True:
        values = torch.empty(capacity + GROUP, dtype=torch.float32)
        positions = torch.empty(capacity + GROUP, dtype=torch.int64)
        above, count, inside, non_finite = kernels.band(
            _bits(model), _bits(base), np.float32(low), np.float32(high), np.float32(tie),
            values.numpy(), positions.numpy(), chunk_ties.numpy(),
        )
        if inside <= capacity:
            return Band(
                int(above), values[:count], positions[:count], int(chunk_ties.sum()), chunk_ties,
                int(non_finite),
            )
        capacity = int(inside)


def consensus(
    base: torch.Tensor,
    models: Sequence[torch.Tensor],
    rules: Sequence[KeepRule],
    scales: Sequence[float],
    weights: Sequence[float],
    *,
    normalize: bool,
    scaling: float,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Return the TIES merge of flat inputs: trim, weigh, elect signs, average the agreeing entries.

    The same computation as `ties._consensus_block` followed by `consensus_merge`,
    in one pass over the inputs. The result is float32, or bf16 when `out_dtype` is
    bf16 (see `output_dtype`).
    """
    kernels = _require()
    if not models:
        return base.to(output_dtype(out_dtype), copy=True)
    # Tuples, not arrays, so the compiled loop keeps them in registers (see fused_numba).
    thresholds = tuple(np.float32(rule.threshold) for rule in rules)
    tie_thresholds = tuple(np.float32(rule.tie_threshold) for rule in rules)
    scale_values = tuple(np.float32(scale) for scale in scales)
    weight_values = tuple(np.float32(weight) for weight in weights)

    def merge_part(base_bits: np.ndarray, model_bits: tuple[np.ndarray, ...], output: np.ndarray, start: int) -> bool:
        # Tie ends are flat positions, so they move with the part's start.
        kernels.consensus(
            base_bits,
            model_bits,
            thresholds,
            tie_thresholds,
            tuple(rule.tie_end - start for rule in rules),
            scale_values,
            weight_values,
            normalize,
            np.float32(scaling),
            output,
            output.dtype == np.uint16,
        )
        return False

    return _merge_in_parts(base, models, merge_part, output_dtype(out_dtype))[0]


def task_arithmetic(
    base: torch.Tensor,
    models: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    divisor: float | None,
    scaling: float,
    out_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, bool]:
    """Return base + scaling * sum(w_i (x_i - base)) of flat inputs, divided by `divisor` unless None.

    The same computation as `combine.merge_task_vectors` without masks or sign
    consensus, in one pass over the inputs. The result is float32, or bf16 when
    `out_dtype` is bf16 (see `output_dtype`). The flag beside it is True when an
    output entry is NaN or infinite, as it is wherever an input entry is: the
    arithmetic turns no NaN or infinity into a finite value.
    """
    kernels = _require()
    weight_values = tuple(np.float32(weight) for weight in weights)

    def merge_part(base_bits: np.ndarray, model_bits: tuple[np.ndarray, ...], output: np.ndarray, start: int) -> bool:
        return kernels.task_arithmetic(
            base_bits,
            model_bits,
            weight_values,
            divisor is not None,
            np.float32(1.0 if divisor is None else divisor),
            np.float32(scaling),
            output,
            output.dtype == np.uint16,
        )

    return _merge_in_parts(base, models, merge_part, output_dtype(out_dtype))


def output_dtype(out_dtype: torch.dtype | None) -> torch.dtype:
    """Return the dtype the kernels write for a merge whose output is `out_dtype`.

    bf16 outputs are rounded inside the kernels, as torch rounds a float32 to bf16, which
    saves a float32 buffer and a conversion pass. Every other output is float32.
    """
    return torch.bfloat16 if out_dtype == torch.bfloat16 else torch.float32


def _merge_in_parts(
    base: torch.Tensor,
    models: Sequence[torch.Tensor],
    merge_part: Callable[[np.ndarray, tuple[np.ndarray, ...], np.ndarray, int], bool],
    dtype: torch.dtype,
) -> tuple[torch.Tensor, bool]:
    """Fill an output of `dtype` part by part, side by side, with `merge_part(base, models, output, start)`.

    Returns the output and whether any part's call returned True.
    """
    output = torch.empty(base.numel(), dtype=dtype)
    base_bits = _bits(base)
    model_bits = tuple(_bits(model) for model in models)
    output_values = _bits(output)
    calls = [
        functools.partial(
            merge_part, base_bits[part], tuple(bits[part] for bits in model_bits), output_values[part], part.start
        )
        for part in split(base.numel())
    ]
    flags = run_parallel(calls)
    return output, any(flags)


def split(total: int) -> list[slice]:
    """Split range(total) into one contiguous part per CPU core (one part for small tensors)."""
    parts = 1 if total < PARALLEL_MIN_ELEMENTS else usable_cores()
    step = -(-total // parts) if total else 1
    # Part boundaries on chunk boundaries keep every part's chunks whole.
    step = -(-step // CHUNK) * CHUNK
    return [slice(start, min(start + step, total)) for start in range(0, total, step)] or [slice(0, 0)]


def usable_cores() -> int:
    """Return the number of CPU cores this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def run_parallel(calls: Sequence[Callable[[], T]]) -> list[T]:
    """Run the calls on worker threads (the kernels release the GIL) and return their results in order."""
    if len(calls) <= 1:
        return [call() for call in calls]
    with ThreadPoolExecutor(max_workers=min(len(calls), usable_cores())) as workers:
        futures = [workers.submit(call) for call in calls]
        return [future.result() for future in futures]


def _bits(tensor: torch.Tensor) -> np.ndarray:
    # bf16 goes in as its 16-bit patterns (numpy has no bf16), float32 as 32-bit ones.
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(np.uint16)
    return tensor.numpy().view(np.uint32)


def _shift(tensor: torch.Tensor) -> np.uint32:
    # A bf16 is the upper half of the float32 with the same value.
    return np.uint32(16 if tensor.dtype == torch.bfloat16 else 0)


def _require() -> ModuleType:
    kernels = _compiled()
    if kernels is None:
        raise RuntimeError(
            "the fused kernels need numba, which is not installed: run pip install numba, "
            "or set MERGEKIT_EXT_KERNELS=torch"
        )
    return kernels


@functools.cache
def _compiled() -> Any:
    try:
        from mergekit_ext.methods import fused_numba
    except ImportError:
        return None
    return fused_numba
