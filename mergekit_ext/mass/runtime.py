"""Two-pass MASS inference over a loaded artifact.

Pass 1 runs the shared model θ_MT up to the router site (the input of the first MLP
linear of block ℓ) and routes every sample to a task set Ω. Pass 2 groups the samples
by Ω and runs each group with θ_Ω, taken from an LRU cache of merged weights. With
`reuse_prefix` (not part of MASS as published), pass 2 keeps the shared model's output
of blocks 0…ℓ−1 from pass 1 and runs only blocks ℓ…L−1 with θ_Ω.

When the task is unknown, every head of the tasks in Ω reads the sample's features.
The head with the largest maximum logit wins, and its argmax is the class.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch.func import functional_call

from mergekit_ext.device import resolve_device
from mergekit_ext.errors import CheckpointError, RecipeError
from mergekit_ext.mass.config import MassConfig, ModelKind, TokenRule, check_token_rule, head_file
from mergekit_ext.mass.router import RouterSettings, RoutingDecision, route, select_tasks
from mergekit_ext.mass.task_store import MergedModelCache, TaskSet, TaskStore
from mergekit_ext.models.adapters import ForwardAdapter, ModelBatch, load_adapter, parameter_names
from mergekit_ext.models.heads import CosineHead
from mergekit_ext.models.router_site import find_block_list, find_router_site

logger = logging.getLogger(__name__)

RoutingGranularity = Literal["sample", "batch"]


class _StopForward(Exception):
    """Raised by the router hook to end pass 1 once the router input is known."""


@dataclass
class MassOutput:
    """Result of two-pass inference on one batch."""

    features: torch.Tensor  # (batch × feature size), from each sample's θ_Ω
    decision: RoutingDecision  # residuals, weights and per-sample task sets of pass 1
    task_sets: list[TaskSet]  # task set each sample ran with (differs from the decision under batch routing)


@dataclass
class MassPrediction:
    """Predicted task and class per sample when the task is unknown."""

    task_index: torch.Tensor
    class_index: torch.Tensor
    output: MassOutput


class MassModel:
    """A loaded MASS artifact: shared model, task factors, router, heads and a cache of θ_Ω."""

    def __init__(
        self,
        adapter: ForwardAdapter,
        config: MassConfig,
        store: TaskStore,
        heads: list[CosineHead],
        *,
        router_layer: int | None = None,
        router_rank: int | None = None,
        token_rule: TokenRule | None = None,
        settings: RouterSettings | None = None,
        cache_capacity: int = 8,
        reuse_prefix: bool = False,
        routing: RoutingGranularity = "sample",
    ) -> None:
        self.adapter = adapter
        self.config = config
        self.store = store
        self.heads = heads
        self.settings = settings or RouterSettings(
            temperature=config.router.temperature,
            threshold=config.router.threshold,
            top_k=config.router.top_k,
            mode=config.router.mode,
        )
        self.reuse_prefix = reuse_prefix
        self.routing = routing
        # False under an oracle head: every head is scored whatever Ω holds.
        self.restrict_to_selected = True

        self.tensor_to_parameter = parameter_names(adapter, store.changed_names)
        unmapped = [name for name in store.changed_names if name not in self.tensor_to_parameter]
        if unmapped:
            logger.info("%d changed tensors are not part of the loaded model (for example %s)", len(unmapped), unmapped[0])
        self.adapter_dtypes = {name: tensor.dtype for name, tensor in adapter.state_dict().items()}
        dtypes = {t: self.adapter_dtypes[p] for t, p in self.tensor_to_parameter.items()}
        self.cache = MergedModelCache(store, cache_capacity, dtypes)
        rule = config.router.token_rule if token_rule is None else token_rule
        check_token_rule(rule, config.model_kind)
        self.adapter.token_rule = rule
        self.router_rank = config.router.rank if router_rank is None else router_rank
        if self.router_rank is not None and self.router_rank < 1:
            raise RecipeError(f"router rank {self.router_rank} is invalid; it must be at least 1")
        self.set_router_layer(config.router.layer if router_layer is None else router_layer)

    @property
    def task_names(self) -> list[str]:
        return list(self.config.task_names)

    @property
    def model_kind(self) -> ModelKind:
        return self.config.model_kind

    def set_router_layer(self, layer: int) -> None:
        """Move the router to block `layer` and rebuild the task bases Vᵢ from that block's factors.

        With a router rank r, Vᵢ keeps only the top r of the k singular vectors. This is
        an extension, not part of MASS as published, and θ_Ω still uses all k.
        """
        site, index = find_router_site(self.adapter.model, layer)
        _, blocks = find_block_list(self.adapter.model)
        self.router_layer = index
        self.router_site = site
        self.site_module = self.adapter.model.get_submodule(site)
        self.blocks = blocks

        weight_parameter = f"model.{site}.weight"
        weight_name = next((t for t, p in self.tensor_to_parameter.items() if p == weight_parameter), None)
        width = int(self.site_module.weight.shape[0 if type(self.site_module).__name__ == "Conv1D" else 1])
        bases = []
        for task in self.store.tasks:
            factors = task.low_rank.get(weight_name) if weight_name else None
            if factors is None:
                bases.append(torch.zeros(0, width, device=self.adapter.device))
            elif type(self.site_module).__name__ == "Conv1D":
                # transformers' Conv1D (GPT-2) stores its weight as (in, out): the input side is u.
                bases.append(factors.u.T[: self.router_rank].contiguous())
            else:
                bases.append(factors.vh[: self.router_rank])
        if all(b.shape[0] == 0 for b in bases):
            raise CheckpointError(
                f"no task changed the router site {site} (block {index}); choose another router layer"
            )
        self.bases = bases

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        device: str | torch.device = "auto",
        router_layer: int | None = None,
        router_rank: int | None = None,
        token_rule: TokenRule | None = None,
        threshold: float | None = None,
        top_k: int | None = None,
        temperature: float | None = None,
        mode: str | None = None,
        cache_capacity: int = 8,
        reuse_prefix: bool | None = None,
        routing: RoutingGranularity = "sample",
    ) -> MassModel:
        """Load an artifact written by `merge mass`; keyword arguments override its router settings."""
        folder = Path(path)
        config = MassConfig.load(folder)
        torch_device = resolve_device(device)
        adapter = load_adapter(folder, config.model_kind, torch_device)
        store = TaskStore.load(folder, config, torch_device)
        heads = [CosineHead.load(folder / head_file(i)).to(torch_device) for i in range(len(config.task_names))] if config.has_heads else []
        stored = config.router
        settings = RouterSettings(
            temperature=stored.temperature if temperature is None else temperature,
            threshold=stored.threshold if threshold is None else threshold,
            top_k=stored.top_k if top_k is None else top_k,
            mode=stored.mode if mode is None else mode,  # type: ignore[arg-type]
        )
        if settings.mode not in ("topk", "top1"):
            raise RecipeError(f"routing mode {settings.mode!r} is invalid; use topk or top1")
        return cls(
            adapter,
            config,
            store,
            heads,
            router_layer=router_layer,
            router_rank=router_rank,
            token_rule=token_rule,
            settings=settings,
            cache_capacity=cache_capacity,
            reuse_prefix=config.reuse_prefix if reuse_prefix is None else reuse_prefix,
            routing=routing,
        )

    # Pass 1 ---------------------------------------------------------------------------

    def router_features(self, batch: ModelBatch, keep_prefix: bool | None = None) -> tuple[torch.Tensor, Any]:
        """Run θ_MT up to the router site; return the token-reduced router input and the prefix output.

        The prefix output (the output of block ℓ−1) is recorded only when `keep_prefix`
        is true, which defaults to the model's `reuse_prefix`.
        """
        keep = self.reuse_prefix if keep_prefix is None else keep_prefix
        captured: dict[str, Any] = {}

        def capture_input(module: torch.nn.Module, args: tuple[Any, ...]) -> None:
            captured["input"] = args[0]
            raise _StopForward

        def capture_prefix(module: torch.nn.Module, args: tuple[Any, ...], output: Any) -> None:
            captured["prefix"] = output

        handles = [self.site_module.register_forward_pre_hook(capture_input)]
        if keep and self.router_layer > 0:
            handles.append(self.blocks[self.router_layer - 1].register_forward_hook(capture_prefix))
        try:
            with torch.inference_mode():
                self.adapter(batch)
        except _StopForward:
            pass
        finally:
            for handle in handles:
                handle.remove()
        if "input" not in captured:
            raise CheckpointError(f"the forward pass never reached the router site {self.router_site}")
        return self.adapter.router_tokens(captured["input"], batch), captured.get("prefix")

    def route(self, batch: ModelBatch) -> tuple[RoutingDecision, Any]:
        features, prefix = self.router_features(batch)
        return route(features, self.bases, self.settings), prefix

    def task_sets_for(self, decision: RoutingDecision, settings: RouterSettings | None = None) -> list[TaskSet]:
        """Return the task set each sample runs with: its own Ω, or one Ω for the batch under batch routing."""
        if self.routing == "batch":
            shared_set = select_tasks(decision.weights.mean(dim=0, keepdim=True), settings or self.settings)[0]
            return [shared_set] * len(decision.task_sets)
        return decision.task_sets

    # Pass 2 ---------------------------------------------------------------------------

    def merged_parameters(self, task_set: TaskSet) -> dict[str, torch.Tensor]:
        """Return θ_Ω as adapter parameter names → tensors (cached)."""
        weights = self.cache.get(task_set)
        return {self.tensor_to_parameter[name]: tensor for name, tensor in weights.items() if name in self.tensor_to_parameter}

    def run(self, raw: Any) -> MassOutput:
        """Two-pass inference on one batch of raw inputs (texts or preprocessed images)."""
        batch = self.adapter.prepare(raw)
        decision, prefix = self.route(batch)
        task_sets = self.task_sets_for(decision)
        features = self.second_pass(batch, task_sets, prefix)
        return MassOutput(features=features, decision=decision, task_sets=task_sets)

    def second_pass(self, batch: ModelBatch, task_sets: Sequence[TaskSet], prefix: Any = None) -> torch.Tensor:
        """Run each group of samples with its θ_Ω and return the features in batch order.

        With a `prefix` (pass 1's output of block ℓ−1), blocks before ℓ are skipped.
        """
        groups: dict[TaskSet, list[int]] = {}
        for row, task_set in enumerate(task_sets):
            groups.setdefault(task_set, []).append(row)
        features: torch.Tensor | None = None
        with torch.inference_mode():
            for task_set, rows in groups.items():
                index = torch.tensor(rows, device=self.adapter.device)
                # Reused prefix activations keep the full batch's padded length.
                sub_batch = self.adapter.select_rows(batch, index, keep_length=prefix is not None)
                parameters = self.merged_parameters(task_set)
                with self._skipped_prefix(prefix, index, batch.size):
                    group_features = functional_call(self.adapter, parameters, (sub_batch,), tie_weights=True, strict=False)
                if features is None:
                    features = torch.empty(batch.size, *group_features.shape[1:], dtype=group_features.dtype, device=group_features.device)
                features[index] = group_features
        assert features is not None
        return features

    @contextmanager
    def _skipped_prefix(self, prefix: Any, rows: torch.Tensor, full_size: int) -> Iterator[None]:
        """Make blocks 0…ℓ−1 return pass 1's output of block ℓ−1 (rows of this group) instead of computing."""
        if prefix is None:
            yield
            return
        recorded = _select_batch_rows(prefix, rows, self.adapter.hidden_batch_dim, full_size)
        patched = list(self.blocks)[: self.router_layer]
        for block in patched:
            block.forward = lambda *args, **kwargs: recorded  # type: ignore[method-assign]
        try:
            yield
        finally:
            for block in patched:
                del block.forward

    def shared_features(self, raw: Any) -> torch.Tensor:
        """Run the shared model θ_MT alone (one pass); the latency reference of one model."""
        with torch.inference_mode():
            return self.adapter(self.adapter.prepare(raw))

    def shared_features_from_prefix(self, batch: ModelBatch, prefix: Any) -> torch.Tensor:
        """Finish the shared model θ_MT from pass 1's output of block ℓ−1 (the whole pass without one)."""
        rows = torch.arange(batch.size, device=self.adapter.device)
        with torch.inference_mode(), self._skipped_prefix(prefix, rows, batch.size):
            return self.adapter(batch)

    # Heads ----------------------------------------------------------------------------

    def head_logits(self, features: torch.Tensor) -> list[torch.Tensor]:
        """Return every task head's logits for the features (one tensor per task)."""
        if not self.heads:
            raise CheckpointError("this MASS artifact has no task heads; build it with --heads to classify")
        return [head(features) for head in self.heads]

    def logits_for_run(self, raw: Any) -> tuple[list[torch.Tensor], MassOutput]:
        """Run two-pass inference; return every head's logits (task order) and the run.

        With `restrict_to_selected`, a head's row is −inf for samples whose Ω leaves that task out.
        """
        output = self.run(raw)
        return self.selected_head_logits(output.features, output.task_sets, self.restrict_to_selected), output

    def selected_head_logits(self, features: torch.Tensor, task_sets: Sequence[TaskSet], restrict: bool = True) -> list[torch.Tensor]:
        """Return every head's logits; with `restrict`, −inf where a sample's Ω leaves the head's task out."""
        logits = self.head_logits(features)
        if restrict:
            for task, task_logits in enumerate(logits):
                outside = torch.tensor([task not in s for s in task_sets], device=task_logits.device)
                task_logits[outside] = float("-inf")
        return logits

    def task_logits(self, texts: Sequence[str], tasks: Sequence[str]) -> dict[str, torch.Tensor]:
        """Return {task: logits [len(texts), classes]} for the requested tasks (the zoo evaluation protocol)."""
        unknown = [task for task in tasks if task not in self.config.task_names]
        if unknown:
            raise RecipeError(f"tasks {unknown} are not in this MASS artifact; it has {self.config.task_names}")
        logits, _ = self.logits_for_run(texts)
        return {task: logits[self.config.task_names.index(task)].cpu() for task in tasks}

    def predict(self, raw: Any) -> MassPrediction:
        """Predict (task, class) per sample: the head with the largest max logit among Ω, then its argmax."""
        logits, output = self.logits_for_run(raw)
        return _select_head(logits, output)

    # Causal LMs -----------------------------------------------------------------------

    def generate(self, prompts: Sequence[str], **generate_kwargs: Any) -> list[str]:
        """Route each prompt on the mean of its tokens, then generate with θ_Ω; returns the new text."""
        if self.model_kind != "causal-lm":
            raise RecipeError(f"generate needs a causal LM artifact, this one is {self.model_kind}")
        batch = self.adapter.prepare(prompts)
        decision, _ = self.route(batch)
        texts: list[str] = [""] * batch.size
        groups: dict[TaskSet, list[int]] = {}
        for row, task_set in enumerate(decision.task_sets):
            groups.setdefault(task_set, []).append(row)
        for task_set, rows in groups.items():
            sub_batch = batch.select(torch.tensor(rows, device=self.adapter.device))
            with torch.inference_mode():
                sequences = functional_call(
                    self.adapter, self.merged_parameters(task_set), (sub_batch,), {"generate_kwargs": generate_kwargs}, tie_weights=True, strict=False
                )
            prompt_length = sub_batch.inputs["input_ids"].shape[1]
            for row, sequence in zip(rows, sequences):
                texts[row] = self.adapter.tokenizer.decode(sequence[prompt_length:], skip_special_tokens=True)  # type: ignore[attr-defined]
        return texts


def _select_head(logits: list[torch.Tensor], output: MassOutput) -> MassPrediction:
    best_logit = torch.stack([task_logits.max(dim=1).values for task_logits in logits], dim=1)
    task_index = best_logit.argmax(dim=1)
    class_index = torch.stack([logits[int(t)][row].argmax() for row, t in enumerate(task_index)])
    return MassPrediction(task_index=task_index.cpu(), class_index=class_index.cpu(), output=output)


def _select_batch_rows(value: Any, rows: torch.Tensor, dim: int, full_size: int) -> Any:
    """Select batch rows in a block output: a tensor, or a tuple of tensors and other values."""
    if isinstance(value, torch.Tensor):
        if value.ndim > dim and value.shape[dim] == full_size:
            return value.index_select(dim, rows.to(value.device))
        return value
    if isinstance(value, tuple) and not hasattr(value, "_fields"):
        return tuple(_select_batch_rows(item, rows, dim, full_size) for item in value)
    if isinstance(value, list):
        return [_select_batch_rows(item, rows, dim, full_size) for item in value]
    return value
