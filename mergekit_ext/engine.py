"""The merge engine: plan a recipe, stream tensors through a kernel, write the output.

Planning checks every input before anything is written: tensor names, shapes,
vocabulary sizes, parameters and free disk space. The merge then walks the base
model's tensors in file order. A small thread pool reads the next tensors while the
current one is merged, and a writer thread writes the previous result. Up to
`merge_workers` units merge side by side, so a kernel that runs on one core at a time
leaves the other cores busy with the next unit. The read-ahead and the merges
beside the oldest one are bounded by count (`prefetch` units) and by bytes
(`prefetch_bytes`, in the dtype each input is loaded as), so peak memory stays near
(inputs + 2) times the largest tensor plus that window, whatever the model size. For
elementwise methods (linear, task arithmetic) a unit is a block of at most
`block_elements` entries of a large tensor, so memory stays near (inputs + 2) blocks
plus the window.

Two things shorten the start of a merge. The first tensors may have been read
already, while this module was imported (`MergeOptions.head_start`, see
checkpoint.head_start). And while the first unit is read, a small made-up merge of
the same kind loads the code the merges need, such as compiled kernels (`_rehearsal`).
"""

from __future__ import annotations

import logging
import math
import resource
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mergekit_ext import __version__
from mergekit_ext.checkpoint import CardInput, Checkpoint, ModelCard, PlannedTensor, StreamingWriter
from mergekit_ext.checkpoint.card import format_bytes, hub_id_of, license_of
from mergekit_ext.checkpoint.files import copy_config, copy_tokenizer, parse_dtype
from mergekit_ext.checkpoint.head_start import HeadStart
from mergekit_ext.checkpoint.layout import SAFETENSORS_SINGLE
from mergekit_ext.checkpoint.writer import DEFAULT_SHARD_SIZE, check_output_folder
from mergekit_ext.device import resolve_device
from mergekit_ext.errors import (
    IncompatibleModelsError,
    InvalidTensorError,
    NonFiniteInputError,
    RecipeError,
    TaskVectorOverflowError,
)
from mergekit_ext.methods import METHODS, get_method
from mergekit_ext.methods.base import MergeMethod, TensorMergeInput
from mergekit_ext.methods.inputs import all_finite
from mergekit_ext.methods.parameters import checked_value
from mergekit_ext.zoo.references import PREFIX, display_name, resolve_model_reference
from mergekit_ext.recipe import ModelEntry, Recipe, layer_index, layer_position, resolve_value

logger = logging.getLogger(__name__)

ProgressCallback = Callable[[int, int, str], None]

# Name fragments of tensors whose first dimension is the vocabulary.
VOCABULARY_TENSORS = ("embed_tokens", "lm_head", "wte", "word_embeddings", "embed_in", "embed_out", "token_embedding")


@dataclass
class MergeOptions:
    """How to run a recipe: where to write and the safety switches."""

    output: Path
    seed: int = 0
    device: str = "auto"
    shard_size: int = DEFAULT_SHARD_SIZE
    force: bool = False
    allow_pickle: bool = False
    truncate_vocab: bool = False
    # Measured on 2 cores, benchmark inputs evicted from the page cache, three rounds. With
    # 16 units TIES took 5.8 to 6.6 s against 6.6 to 6.9 s with 4. Task arithmetic took 5.1
    # to 5.8 s against 5.4 to 6.6 s. Peak memory grew by 0.15 GB.
    prefetch: int = 16
    prefetch_bytes: int = 1 << 30
    read_threads: int = 4
    merge_workers: int = 2  # units merged side by side
    block_elements: int = 1 << 21  # row blocks of elementwise merges: 8 MiB per input in float32
    tokenizer_from: Path | None = None
    recipe_path: Path | None = None
    # The first tensors, read while the merge code was imported (see checkpoint.head_start).
    head_start: HeadStart | None = None


@dataclass
class MergeReport:
    """Summary of a finished merge: output, counts, timings and input hashes."""

    output: Path
    tensors: int
    bytes_written: int
    seconds: float
    peak_rss_bytes: int
    input_hashes: dict[str, str] = field(default_factory=dict)

    def summary(self) -> str:
        return (
            f"Merged {self.tensors} tensors into {self.output}: {format_bytes(self.bytes_written)} "
            f"written in {self.seconds:.2f} s, peak memory {format_bytes(self.peak_rss_bytes)}"
        )


@dataclass
class _TensorPlan:
    name: str
    shape: tuple[int, ...]
    out_dtype: torch.dtype
    mergeable: bool
    model_parameters: list[dict[str, float]]
    parameters: dict[str, float]
    truncate_rows: int | None = None


@dataclass
class _Inputs:
    base: Checkpoint | None
    models: list[Checkpoint]
    reference: Checkpoint  # the checkpoint whose tensor names and order define the output

    @property
    def checkpoints(self) -> list[Checkpoint]:
        """Return the base (if any) and the models, in the order the merge reads them."""
        return [c for c in [self.base, *self.models] if c is not None]


def run_recipe(recipe: Recipe, options: MergeOptions, progress: ProgressCallback | None = None) -> MergeReport:
    """Merge the models of `recipe` into `options.output` and return a report."""
    started = time.perf_counter()
    method = get_method(recipe.merge_method)
    check_output_folder(options.output, _input_paths(recipe), options.force)
    inputs = _open_inputs(recipe, method, options)
    device = resolve_device(options.device)
    out_dtype = parse_dtype(recipe.out_dtype or recipe.dtype)
    plan = _plan(recipe, method, inputs, out_dtype, options.truncate_vocab)

    checkpoints = inputs.checkpoints
    writer_plan = [PlannedTensor(p.name, p.shape, p.out_dtype) for p in plan]
    logger.info(
        "Merging %d tensors of %d inputs with %s on %s", len(plan), len(checkpoints), method.name, device
    )
    with StreamingWriter(
        options.output,
        writer_plan,
        shard_size=options.shard_size,
        force=options.force,
        inputs=[c.path for c in checkpoints],
        metadata={"mergekit_ext_version": __version__, "merge_method": method.name},
    ) as writer:
        # The input hashes for the model card come from the bytes the merge reads, so
        # new inputs are not read a second time (see Checkpoint.start_sha256).
        finish_hashes = {str(c.path): c.start_sha256() for c in checkpoints}
        with _compute_threads(method, device):
            _stream(plan, inputs, method, writer, device, options, progress)
        hashes = {path: finish() for path, finish in finish_hashes.items()}
        _write_side_files(recipe, inputs, writer, out_dtype or _reference_dtype(plan), hashes, options)
        output = writer.commit()

    report = MergeReport(
        output=output,
        tensors=len(plan),
        bytes_written=writer.bytes_written,
        seconds=time.perf_counter() - started,
        peak_rss_bytes=peak_rss_bytes(),
        input_hashes=hashes,
    )
    logger.debug(report.summary())
    return report


@contextmanager
def _compute_threads(method: MergeMethod, device: torch.device) -> Iterator[None]:
    """Run block kernels on CPU with one torch thread, restoring the count afterwards.

    The kernels of elementwise methods and of methods taking stored dtypes work on
    cache-sized blocks. There torch's intra-op threads hardly speed up an operation,
    but they keep spinning on the cores that the reader and hashing threads need.
    Measured on 2 cores (Qwen2-0.5B shapes, 4 models, warm page cache): TIES took
    27.5-29.0 s with them and 17.3 s without. Task arithmetic showed no clear
    difference in three pairs of runs. Other methods (SVD-based, say) keep torch's setting.
    NOTE: on a many-core machine one thread may leave TIES slower than it could be
    (not measured).
    """
    if device.type != "cpu" or not (method.elementwise or method.stored_dtype_inputs):
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _input_paths(recipe: Recipe) -> list[Path]:
    paths = [Path(path) for path in recipe.model_paths()]
    if recipe.base_model:
        paths.append(Path(recipe.base_model))
    return [path for path in paths if not str(path).startswith(PREFIX) and path.exists()]


def peak_rss_bytes() -> int:
    """Return the peak resident memory of this process in bytes."""
    # VmHWM starts afresh at exec. ru_maxrss does not: it also counts the parent's
    # memory that a forked child shared before exec, so prefer VmHWM where it exists.
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB


def _open_inputs(recipe: Recipe, method: MergeMethod, options: MergeOptions) -> _Inputs:
    if method.requires_base and not recipe.base_model:
        raise RecipeError(
            f"method {method.name!r} needs a base model: set 'base_model' in the recipe "
            "(or --base on the per-method commands)"
        )
    base = None
    if recipe.base_model:
        base = Checkpoint.open(resolve_model_reference(recipe.base_model), allow_pickle=options.allow_pickle)
    model_paths = recipe.model_paths()
    if not model_paths:
        listed = f" besides the base {recipe.base_model}" if recipe.models else ""
        raise RecipeError(
            f"no models to merge{listed}: list at least one other model under 'models' (or in --models)"
        )
    if len(model_paths) < len(recipe.models):
        logger.warning(
            "The base model %s is also listed under the models; it is left out of them, as "
            "mergekit 0.1.5 does, and the merge is the same as without that entry.",
            recipe.base_model,
        )
    models = [Checkpoint.open(resolve_model_reference(path), allow_pickle=options.allow_pickle) for path in model_paths]
    for checkpoint in [base, *models]:
        if checkpoint is not None:
            checkpoint.head_start = options.head_start
    return _Inputs(base=base, models=models, reference=base or models[0])


def _model_entries(recipe: Recipe) -> list[ModelEntry]:
    return [entry for entry in recipe.models if entry.model != recipe.base_model]


def _plan(
    recipe: Recipe,
    method: MergeMethod,
    inputs: _Inputs,
    out_dtype: torch.dtype | None,
    truncate_vocab: bool,
) -> list[_TensorPlan]:
    _check_parameter_names(recipe, method)
    _check_vocabulary_configs(inputs, truncate_vocab)
    _warn_extra_tensors(inputs)
    num_layers = _num_layers(inputs.reference)
    entries = _model_entries(recipe)
    plan = []
    for name in inputs.reference.names:
        info = inputs.reference.info(name)
        truncate_rows = _check_tensor(name, info.shape, inputs, truncate_vocab)
        mergeable = info.dtype.is_floating_point
        t = layer_position(name, num_layers)
        model_parameters = [
            _resolve_parameters(
                method,
                [entry.parameters, recipe.parameters],
                name,
                t,
                per_model=True,
                where=f"model {index}, tensor {name}",
            )
            for index, entry in enumerate(entries)
        ]
        parameters = _resolve_parameters(
            method, [recipe.parameters], name, t, per_model=False, where=f"tensor {name}"
        )
        dtype = (out_dtype or info.dtype) if mergeable else info.dtype
        plan.append(
            _TensorPlan(
                name=name,
                shape=info.shape,
                out_dtype=dtype,
                mergeable=mergeable,
                model_parameters=model_parameters,
                parameters=parameters,
                truncate_rows=truncate_rows,
            )
        )
    return plan


def _warn_extra_tensors(inputs: _Inputs) -> None:
    # The output follows the base's tensor list, so tensors only other models have are dropped.
    reference_names = set(inputs.reference.names)
    for model in [inputs.base, *inputs.models]:
        if model is None or model is inputs.reference:
            continue
        extra = [name for name in model.names if name not in reference_names]
        if extra:
            logger.warning(
                "%d %s of %s not in %s and left out of the output (for example %r)",
                len(extra),
                "tensor is" if len(extra) == 1 else "tensors are",
                model.path,
                inputs.reference.path,
                extra[0],
            )


def _check_parameter_names(recipe: Recipe, method: MergeMethod) -> None:
    """Reject unknown parameter names; warn about and ignore other methods' parameters.

    mergekit accepts a recipe that sets, say, `density` for task arithmetic and ignores
    it, so such a recipe runs here too. A name that no method declares is a typo and fails.
    """
    per_model = {spec.name for spec in method.parameters if spec.per_model}
    known = {spec.name for spec in method.parameters}
    every_method = {spec.name for other in METHODS.values() for spec in other.parameters}

    def check(key: str, location: str, accepted: set[str]) -> None:
        if key in accepted:
            return
        if key in every_method and key not in known:
            logger.warning("%s: %r is not a parameter of %r; it is ignored", location, key, method.name)
            return
        raise RecipeError(
            f"{location}: parameter {key!r} is not accepted by {method.name!r}; "
            f"accepted: {', '.join(sorted(accepted)) or 'none'}"
        )

    for key in recipe.parameters:
        check(key, "parameters", known)
    for entry in _model_entries(recipe):
        for key in entry.parameters:
            check(key, f"models[{entry.model}].parameters", per_model)


def _resolve_parameters(
    method: MergeMethod,
    sources: Sequence[dict[str, Any]],
    name: str,
    t: float,
    per_model: bool,
    where: str,
) -> dict[str, float]:
    """Resolve the method's parameters for one tensor; the first source that sets a value wins.

    Per-model parameters look in the model entry, then in the top-level parameters (as
    mergekit does), then take the method default. Values are range-checked here, so a
    bad value fails before anything is written; `where` names the model and tensor.
    """
    resolved: dict[str, float] = {}
    for spec in method.parameters:
        if spec.per_model != per_model:
            continue
        value = None
        for source in sources:
            if spec.name in source:
                value = resolve_value(source[spec.name], name, t, spec.name)
                if value is not None:
                    break
        if value is None:
            value = spec.default
        if value is None:
            raise RecipeError(f"method {method.name!r} needs parameter {spec.name!r} ({spec.description})")
        resolved[spec.name] = checked_value(method.name, spec, value, where)
    return resolved


def _num_layers(checkpoint: Checkpoint) -> int:
    config = checkpoint.config or {}
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if isinstance(config.get(key), int):
            return config[key]
    indices = [layer_index(name) for name in checkpoint.names]
    known = [index for index in indices if index is not None]
    return max(known) + 1 if known else 1


def _check_vocabulary_configs(inputs: _Inputs, truncate_vocab: bool) -> None:
    reference_size = (inputs.reference.config or {}).get("vocab_size")
    for model in [inputs.base, *inputs.models]:
        if model is None or model is inputs.reference:
            continue
        size = (model.config or {}).get("vocab_size")
        if reference_size and size and size != reference_size and not truncate_vocab:
            raise IncompatibleModelsError(
                f"vocabulary size mismatch: {inputs.reference.path} has {reference_size} tokens and "
                f"{model.path} has {size}; pass --truncate-vocab to cut every vocabulary to the base's size"
            )


def _check_tensor(name: str, shape: tuple[int, ...], inputs: _Inputs, truncate_vocab: bool) -> int | None:
    truncate_rows = None
    for model in [inputs.base, *inputs.models]:
        if model is None or model is inputs.reference:
            continue
        if name not in model:
            raise IncompatibleModelsError(
                f"tensor {name!r} is in {inputs.reference.path} but missing in {model.path}; "
                "all models must share the base's architecture"
            )
        other = model.info(name).shape
        if other == shape:
            continue
        is_vocabulary = any(part in name for part in VOCABULARY_TENSORS)
        if is_vocabulary and len(other) == len(shape) and other[1:] == shape[1:]:
            if not truncate_vocab:
                raise IncompatibleModelsError(
                    f"vocabulary size mismatch in {name!r}: {shape[0]} rows in {inputs.reference.path}, "
                    f"{other[0]} in {model.path}; pass --truncate-vocab to cut to the base's vocabulary"
                )
            if other[0] < shape[0]:
                raise IncompatibleModelsError(
                    f"cannot truncate {name!r}: {model.path} has {other[0]} rows, fewer than the "
                    f"base's {shape[0]}; use the model with the smaller vocabulary as the base"
                )
            truncate_rows = shape[0]
            continue
        raise IncompatibleModelsError(
            f"shape mismatch in {name!r}: {tuple(shape)} in {inputs.reference.path} but "
            f"{tuple(other)} in {model.path}; merge only checkpoints of the base's architecture and size"
        )
    return truncate_rows


@dataclass(frozen=True)
class _Unit:
    """One piece of merge work: a whole tensor, or a block of its rows."""

    item: _TensorPlan
    rows: tuple[int, int] | None = None  # None: the whole tensor

    @property
    def elements(self) -> int:
        shape = self.item.shape
        if self.rows is not None:
            shape = (self.rows[1] - self.rows[0], *shape[1:])
        return math.prod(shape)

    @property
    def completes_tensor(self) -> bool:
        return self.rows is None or self.rows[1] == self.item.shape[0]


def _units(plan: Sequence[_TensorPlan], method: MergeMethod, block_elements: int) -> list[_Unit]:
    """Split the plan into work units: row blocks of large tensors for elementwise methods.

    An elementwise method gives the same result on a block of rows as on the whole
    tensor. Blocks keep every intermediate small, so memory is reused from block to
    block instead of being allocated and faulted in afresh for each large tensor.
    """
    units = []
    for item in plan:
        whole = _Unit(item)
        if not (method.elementwise and item.mergeable and item.shape) or whole.elements <= block_elements:
            units.append(whole)
            continue
        rows = item.shape[0]
        step = max(1, block_elements // max(1, whole.elements // rows))
        units.extend(_Unit(item, (start, min(start + step, rows))) for start in range(0, rows, step))
    return units


# Entries of the made-up merge run before the first unit arrives (see `_rehearsal`). Inputs this
# large take the fused kernels (fused.MIN_ELEMENTS), which smaller ones never load.
REHEARSAL_ELEMENTS = 1 << 16
# Dtypes whose values float32 represents exactly, so a method converting them itself loses nothing.
_FLOAT32_EXACT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _merge_dtype(stored: torch.dtype, method: MergeMethod) -> torch.dtype:
    """Return the dtype a method receives an input stored as `stored` in: float32, or as stored."""
    return stored if method.stored_dtype_inputs and stored in _FLOAT32_EXACT_DTYPES else torch.float32


def _load_one(unit: _Unit, checkpoint: Checkpoint, device: torch.device, method: MergeMethod) -> torch.Tensor:
    """Read one unit of one input as float32, or as stored (bf16, f16, f32) where the method takes that.

    Raises `InvalidTensorError` for NaN or Inf, unless the method checks that itself.
    """
    item = unit.item
    tensor = checkpoint.load(item.name, unit.rows)
    if unit.rows is None and item.truncate_rows is not None:
        tensor = tensor[: item.truncate_rows]
    if not item.mergeable:
        return tensor
    tensor = tensor.to(device=device, dtype=_merge_dtype(tensor.dtype, method))
    if not method.checks_finite and not all_finite(tensor, load_kernels=False):
        raise _non_finite_error(item.name, checkpoint)
    return tensor


def _rehearsal(
    plan: Sequence[_TensorPlan], inputs: _Inputs, method: MergeMethod, device: torch.device, seed: int
) -> TensorMergeInput | None:
    """Return a small made-up merge like the plan's first large one, or None when the plan has none.

    Merging it while the first inputs are read loads the code the real merges run,
    such as numba and its compiled kernels. Loading those took about 0.5 s of a TIES
    merge of Qwen2-0.5B shapes (4 bf16 models), with the disk idle. Its tensors have the
    trailing dimensions, dtypes and parameters of that merge, and REHEARSAL_ELEMENTS
    entries or a little more.
    """
    item = next(
        (item for item in plan if item.mergeable and item.shape and math.prod(item.shape) >= REHEARSAL_ELEMENTS),
        None,
    )
    if item is None:
        return None
    row = math.prod(item.shape[1:])
    if row <= REHEARSAL_ELEMENTS:
        shape = (min(item.shape[0], -(-REHEARSAL_ELEMENTS // row)), *item.shape[1:])
    else:
        shape = (REHEARSAL_ELEMENTS,)  # a few huge rows: a flat tensor instead
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=generator) * 0.02
    checkpoints = inputs.checkpoints
    tensors = [
        (base + torch.randn(shape, generator=generator) * 0.002 * index).to(
            device=device, dtype=_merge_dtype(checkpoint.info(item.name).dtype, method)
        )
        for index, checkpoint in enumerate(checkpoints)
    ]
    return TensorMergeInput(
        name=item.name,
        base=tensors[0] if inputs.base is not None else None,
        models=tensors[1:] if inputs.base is not None else tensors,
        model_parameters=item.model_parameters,
        parameters=item.parameters,
        seed=seed,
        out_dtype=item.out_dtype,
    )


def _rehearse(
    plan: Sequence[_TensorPlan], inputs: _Inputs, method: MergeMethod, device: torch.device, seed: int
) -> None:
    """Run the merge of `_rehearsal`, if any, and drop its result."""
    try:
        example = _rehearsal(plan, inputs, method, device, seed)
        if example is not None:
            method.merge(example)
    except Exception as error:  # noqa: BLE001 - the real merges report any problem themselves
        logger.debug("the rehearsal merge failed (%s); the merge goes on without it", error)


def _non_finite_error(name: str, checkpoint: Checkpoint) -> InvalidTensorError:
    # Only a wider stored dtype (float64) has finite values that become Inf in float32.
    wider = checkpoint.info(name).dtype not in _FLOAT32_EXACT_DTYPES
    return InvalidTensorError(
        f"tensor {name!r} in {checkpoint.path} contains NaN or Inf values"
        f"{' (or values too large for float32)' if wider else ''}; repair or re-export that checkpoint"
    )


def _stream(
    plan: Sequence[_TensorPlan],
    inputs: _Inputs,
    method: MergeMethod,
    writer: StreamingWriter,
    device: torch.device,
    options: MergeOptions,
    progress: ProgressCallback | None,
) -> None:
    units = _units(plan, method, options.block_elements)

    checkpoints = inputs.checkpoints

    def unit_bytes(unit: _Unit) -> int:
        # The bytes the unit's inputs take once loaded, in the dtype the method receives them in.
        # Counting float32 for inputs that stay bf16 would halve the window that `prefetch_bytes` sets.
        item = unit.item
        dtypes = [checkpoint.info(item.name).dtype for checkpoint in checkpoints]
        if item.mergeable:
            dtypes = [_merge_dtype(dtype, method) for dtype in dtypes]
        return unit.elements * sum(dtype.itemsize for dtype in dtypes)

    if progress is not None:
        progress(0, len(plan), "")
    merge_workers = max(1, options.merge_workers)
    # Writes run on their own thread, one at a time, while the next unit merges. Copying
    # the output into the page cache took 1.8 s of a profiled 13.5 s TIES merge (Qwen2-0.5B shapes).
    with (
        ThreadPoolExecutor(max_workers=max(1, options.read_threads)) as pool,
        ThreadPoolExecutor(max_workers=merge_workers, thread_name_prefix="mergekit-ext-merge") as merge_pool,
        ThreadPoolExecutor(max_workers=1, thread_name_prefix="mergekit-ext-writer") as write_pool,
        ThreadPoolExecutor(max_workers=1, thread_name_prefix="mergekit-ext-rehearsal") as rehearsal_pool,
    ):
        # One read per input and unit, so the inputs of one unit load in parallel.
        pending: deque[tuple[_Unit, list[Future[torch.Tensor]]]] = deque()
        # Units being merged, oldest first. Their results are written in this order.
        merging: deque[tuple[_Unit, Future[torch.Tensor]]] = deque()
        writing: Future[None] | None = None
        # Bytes in the window: units read or being read, and units merging beside
        # the oldest one. The oldest merging unit is outside it, so the window refills
        # while a large unit (an embedding table, say) is merged.
        in_flight = 0
        position = 0
        tensors_done = 0

        def read_ahead() -> None:
            # Read ahead while the window has room, by count and by bytes. The next unit
            # is always read, however large it is.
            nonlocal in_flight, position
            while position < len(units) and len(pending) < 1 + options.prefetch:
                size = unit_bytes(units[position])
                if pending and in_flight + size > options.prefetch_bytes:
                    break
                futures = [
                    pool.submit(_load_one, units[position], checkpoint, device, method)
                    for checkpoint in checkpoints
                ]
                pending.append((units[position], futures))
                in_flight += size
                position += 1

        def start_merges() -> None:
            # A unit merges beside older ones only while the window has room, so the
            # merges beside the oldest one stay within the window.
            nonlocal in_flight
            while pending and len(merging) < merge_workers:
                unit, futures = pending[0]
                if merging and in_flight > options.prefetch_bytes:
                    break
                pending.popleft()
                if not merging:
                    in_flight -= unit_bytes(unit)
                merging.append((unit, merge_pool.submit(_merge_loaded, unit, futures, inputs, method, options.seed)))

        try:
            read_ahead()
            # While the first unit is read, another thread merges a small made-up one (see `_rehearsal`).
            rehearsal_pool.submit(_rehearse, plan, inputs, method, device, options.seed)
            for _ in range(len(units)):
                start_merges()
                # Refill the window before waiting, so the disk keeps reading while units merge.
                read_ahead()
                unit, merging_now = merging.popleft()
                merged = merging_now.result()
                if merging:
                    # The next unit becomes the oldest merge, which the window does not count.
                    in_flight -= unit_bytes(merging[0][0])
                if writing is not None:
                    # At most one output unit waits to be written.
                    writing.result()
                row_start = None if unit.rows is None else unit.rows[0]
                writing = write_pool.submit(writer.write, unit.item.name, merged, row_start)
                del merged
                if unit.completes_tensor:
                    tensors_done += 1
                    if progress is not None:
                        progress(tensors_done, len(plan), unit.item.name)
            if writing is not None:
                writing.result()
        except BaseException:
            # Stop queued reads and merges, so the error reaches the user without waiting for them.
            for executor in (pool, merge_pool, write_pool, rehearsal_pool):
                executor.shutdown(wait=False, cancel_futures=True)
            raise


def _merge_loaded(
    unit: _Unit, futures: list[Future[torch.Tensor]], inputs: _Inputs, method: MergeMethod, seed: int
) -> torch.Tensor:
    """Wait for one unit's reads and merge it."""
    loaded = [future.result() for future in futures]
    base = loaded[0] if inputs.base is not None else None
    models = loaded[1:] if inputs.base is not None else loaded
    try:
        return _merge_one(unit.item, base, models, method, seed)
    except torch.linalg.LinAlgError as error:
        # A decomposition (SVD, eigh) of the subspace merges failed, most likely on
        # values so large that their sums overflow float32.
        raise InvalidTensorError(
            f"merging tensor {unit.item.name!r} with {method.name} failed: {error}. Check the "
            "inputs for extreme values, or use a method without a decomposition (task_arithmetic, ties)"
        ) from None
    except TaskVectorOverflowError as error:
        raise InvalidTensorError(
            f"tensor {unit.item.name!r} of {inputs.models[error.model_index].path} differs from the base "
            "by more than float32 can represent (about 3.4e38), so its task vector is infinite. Check both "
            "checkpoints for corrupted values, or use a method without a decomposition (task_arithmetic, ties)"
        ) from None
    except NonFiniteInputError as error:
        # The method checked its inputs itself (`checks_finite`): name the checkpoint.
        checkpoint = inputs.base if error.model_index is None else inputs.models[error.model_index]
        assert checkpoint is not None
        raise _non_finite_error(unit.item.name, checkpoint) from None


def _merge_one(
    item: _TensorPlan,
    base: torch.Tensor | None,
    models: list[torch.Tensor],
    method: MergeMethod,
    seed: int,
) -> torch.Tensor:
    if not item.mergeable:
        # Integer buffers (position ids, masks) are copied from the base model.
        return (base if base is not None else models[0]).clone()
    merged = method.merge(
        TensorMergeInput(
            name=item.name,
            base=base,
            models=models,
            model_parameters=item.model_parameters,
            parameters=item.parameters,
            seed=seed,
            out_dtype=item.out_dtype,
        )
    )
    return merged.to(dtype=item.out_dtype)


def _reference_dtype(plan: Sequence[_TensorPlan]) -> torch.dtype:
    for item in plan:
        if item.mergeable:
            return item.out_dtype
    return torch.float32


def _write_side_files(
    recipe: Recipe,
    inputs: _Inputs,
    writer: StreamingWriter,
    dtype: torch.dtype,
    hashes: dict[str, str],
    options: MergeOptions,
) -> None:
    reference_folder = inputs.reference.folder
    if not copy_config(writer, reference_folder, dtype):
        logger.warning(
            "No config.json in %s, so the output has none. Pass the base as a checkpoint folder "
            "that contains its config.json, or copy one into the output.",
            reference_folder,
        )
    tokenizer_folder = _tokenizer_folder(recipe, inputs, options)
    copy_tokenizer(writer, tokenizer_folder)
    writer.write_text("merge_recipe.yaml", recipe.to_yaml())

    card_inputs = []
    for checkpoint in [inputs.base, *inputs.models]:
        if checkpoint is None:
            continue
        role = "base" if checkpoint is inputs.base else "model"
        card_inputs.append(
            CardInput(
                name=_card_model_name(str(checkpoint.path)),
                sha256=hashes[str(checkpoint.path)],
                role=role,
                repo_id=hub_id_of(checkpoint.folder),
            )
        )
    card = ModelCard(
        title=recipe.name or f"{recipe.merge_method} merge",
        method=recipe.merge_method,
        inputs=card_inputs,
        parameters=_card_parameters(recipe),
        seed=options.seed,
        license=license_of(reference_folder),
    )
    writer.write_text("README.md", card.render())


def _tokenizer_folder(recipe: Recipe, inputs: _Inputs, options: MergeOptions) -> Path:
    if options.tokenizer_from is not None:
        return Path(options.tokenizer_from)
    source = recipe.tokenizer_source
    if source in (None, "base"):
        return inputs.reference.folder
    if source == "union":
        raise RecipeError("tokenizer_source 'union' is not supported; use 'base' or a model path")
    folder = Path(source)
    if not folder.is_dir():
        raise RecipeError(f"tokenizer_source {source!r} is not a folder; use 'base' or a model folder")
    return folder


def _card_parameters(recipe: Recipe) -> dict[str, Any]:
    # Model entries appear by folder name so the card carries no local paths.
    models = [
        {"model": _card_model_name(entry.model), **({"parameters": entry.parameters} if entry.parameters else {})}
        for entry in _model_entries(recipe)
    ]
    data: dict[str, Any] = {}
    if recipe.base_model:
        data["base_model"] = _card_model_name(recipe.base_model)
    data["models"] = models
    if recipe.parameters:
        data["parameters"] = recipe.parameters
    # The recipe's keys: `dtype` is the computation dtype, `out_dtype` the output's.
    if recipe.dtype:
        data["dtype"] = recipe.dtype
    if recipe.out_dtype:
        data["out_dtype"] = recipe.out_dtype
    return _plain(data)


def _card_model_name(reference: str) -> str:
    if reference.startswith(PREFIX):
        return reference
    path = Path(reference)
    # A weight file with the standard name does not identify the model, so its folder does.
    if path.name == SAFETENSORS_SINGLE and path.parent.name:
        path = path.parent
    return display_name(path)


def _plain(value: Any) -> Any:
    if hasattr(value, "model_dump"):
        return _plain(value.model_dump(exclude_none=True))
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_plain(item) for item in value]
    return value
