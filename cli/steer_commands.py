"""`merge steer ...`: steering vectors, the refusal direction, abliteration and bundle audits."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from mergekit_ext.cli.main import GlobalOptions
from mergekit_ext.cli.progress import progress_callback

TEMPLATE_CHOICE = click.Choice(["chat", "plain"])


def _counter(update: Any, total: int | None, label: str) -> Any:
    """Adapt a (done, total, label) progress bar to the library's progress(count) callback."""
    state = {"done": 0}

    def advance(count: int) -> None:
        state["done"] += count
        update(state["done"], total, label)

    return advance


def _parse_layer_strengths(values: tuple[str, ...]) -> dict[int, float]:
    strengths = {}
    for value in values:
        layer, separator, strength = value.partition("=")
        try:
            strengths[int(layer)] = float(strength)
        except ValueError:
            raise click.BadParameter(f"expected LAYER=STRENGTH, got {value!r}", param_hint="--layer-strength") from None
        if not separator:
            raise click.BadParameter(f"expected LAYER=STRENGTH, got {value!r}", param_hint="--layer-strength")
    return strengths


def _refusal_at(path: str, layer: int | None) -> Any:
    from mergekit_ext.errors import RecipeError
    from mergekit_ext.steer.vector import SteeringVector

    vector = SteeringVector.load(path)
    if layer is None:
        if len(vector.layers) != 1:
            raise RecipeError(f"{path} has directions at layers {vector.layers}; choose one with --direction-layer")
        layer = vector.layers[0]
    if layer not in vector.directions:
        raise RecipeError(f"{path} has no direction at layer {layer}; it has {vector.layers}")
    return vector.directions[layer]


@click.group("steer")
def steer_group() -> None:
    """Steering vectors: extract, apply, refusal direction, orthogonalize, abliterate, audit."""


@steer_group.command("extract")
@click.option("--model", "model_path", required=True, type=click.Path(exists=True, file_okay=False), help="Model folder (safetensors).")
@click.option("--pairs", "pairs_path", required=True, type=click.Path(exists=True, dir_okay=False), help="JSONL of positive/negative or prompt/prompt_without_instruction rows.")
@click.option("--layer", "layers", type=int, multiple=True, required=True, help="Decoder block whose output is read (repeatable); layer L = hidden_states[L+1].")
@click.option("--position", default="last", show_default=True, help="Token rule: last, mean, or index:-k[,-j].")
@click.option("--method", default="mean_difference", show_default=True, type=click.Choice(["mean_difference", "pca", "median", "trimmed_mean"]), help="Aggregation of the per-pair differences.")
@click.option("--trim", default=0.1, show_default=True, type=float, help="Fraction cut at each end by trimmed_mean.")
@click.option("--template", default="chat", show_default=True, type=TEMPLATE_CHOICE, help="Wrap texts in the tokenizer's chat template, or use them plain.")
@click.option("--alpha", default=1.0, show_default=True, type=float, help="Default scale recorded in the recipe.")
@click.option("--protocol", default="prefill", show_default=True, type=click.Choice(["prefill", "all-steps"]), help="Default protocol recorded in the recipe.")
@click.option("--batch-size", default=8, show_default=True, type=int, help="Prompts per forward pass.")
@click.option("--output", "-o", required=True, type=click.Path(file_okay=False), help="Bundle folder to write.")
@click.option("--force", is_flag=True, help="Replace a non-empty output folder.")
@click.pass_obj
def extract_command(options: GlobalOptions, model_path: str, pairs_path: str, layers: tuple[int, ...], position: str, method: str, trim: float, template: str, alpha: float, protocol: str, batch_size: int, output: str, force: bool) -> None:
    """Extract a steering vector from contrastive pairs and write a bundle."""
    from mergekit_ext.steer.bundle import SteeringBundle, save_bundle
    from mergekit_ext.steer.data import load_pairs
    from mergekit_ext.steer.extract import extract_steering_vector
    from mergekit_ext.steer.model_access import load_causal_lm
    from mergekit_ext.steer.template import PromptTemplate

    pairs = load_pairs(pairs_path)
    model, tokenizer = load_causal_lm(model_path, options.device)
    with progress_callback("Extracting") as update:
        vector = extract_steering_vector(
            model, tokenizer, pairs, list(layers), PromptTemplate.for_tokenizer(tokenizer, template), position, method, trim,
            batch_size, Path(model_path).name, _counter(update, 2 * len(pairs), "prompts"),
        )  # fmt: skip
    vector = vector.with_recipe(alpha=alpha, protocol=protocol)
    folder = save_bundle(SteeringBundle(vector=vector, pairs=pairs), output, force=force)
    norms = ", ".join(f"layer {layer}: |v| = {float(vector.directions[layer].norm()):.4g}" for layer in vector.layers)
    click.echo(f"Wrote {folder} ({len(pairs)} pairs; {norms})")


@click.command("generate")
@click.option("--model", "model_path", required=True, type=click.Path(exists=True, file_okay=False), help="Model folder (safetensors).")
@click.option("--vector", "vector_path", type=click.Path(exists=True), help="Bundle folder or vector file (.safetensors, .gguf); omit to generate unsteered.")
@click.option("--prompt", "prompts", multiple=True, help="Prompt text (repeatable).")
@click.option("--prompts-file", type=click.Path(exists=True, dir_okay=False), help="Text file with one prompt per line.")
@click.option("--alpha", type=float, help="Scale of the vector [default: the recipe's alpha].")
@click.option("--protocol", type=click.Choice(["prefill", "all-steps"]), help="prefill: steer the prompt only; all-steps: every token [default: the recipe's].")
@click.option("--max-new-tokens", default=48, show_default=True, type=int, help="Tokens generated per prompt (greedy).")
@click.option("--template", default="chat", show_default=True, type=TEMPLATE_CHOICE, help="Prompt wrapping.")
@click.option("--allow-pickle", is_flag=True, help="Allow a pickled vector file (loaded with weights_only=True).")
@click.pass_obj
def generate_command(options: GlobalOptions, model_path: str, vector_path: str | None, prompts: tuple[str, ...], prompts_file: str | None, alpha: float | None, protocol: str | None, max_new_tokens: int, template: str, allow_pickle: bool) -> None:
    """Generate greedy completions with a steering vector added at its layers' block outputs."""
    from mergekit_ext.steer.apply import generate
    from mergekit_ext.steer.bundle import load_vector
    from mergekit_ext.steer.model_access import load_causal_lm
    from mergekit_ext.steer.template import PromptTemplate

    texts = list(prompts)
    if prompts_file:
        texts += [line for line in Path(prompts_file).read_text(encoding="utf-8").splitlines() if line.strip()]
    if not texts:
        raise click.UsageError("give at least one --prompt or a --prompts-file")
    vector = load_vector(vector_path, allow_pickle) if vector_path else None
    model, tokenizer = load_causal_lm(model_path, options.device)
    scale, mode = 1.0, "all-steps"
    if vector is not None:
        scale, mode = vector.recipe.alpha, vector.recipe.protocol
    scale = alpha if alpha is not None else scale
    mode = protocol or mode
    outputs = generate(model, tokenizer, texts, PromptTemplate.for_tokenizer(tokenizer, template), vector, scale, mode, max_new_tokens)
    for prompt, text in zip(texts, outputs):
        click.echo(json.dumps({"prompt": prompt, "response": text, "alpha": scale if vector else 0.0, "protocol": mode}, ensure_ascii=False))


steer_group.add_command(generate_command, "generate")
steer_group.add_command(generate_command, "apply")


@steer_group.command("refusal")
@click.option("--model", "model_path", required=True, type=click.Path(exists=True, file_okay=False), help="Model folder (safetensors).")
@click.option("--harmful", required=True, type=click.Path(dir_okay=False), help='JSON list of {"instruction", "category"} (for example harmful_train.json).')
@click.option("--harmless", required=True, type=click.Path(dir_okay=False), help="JSON list of harmless instructions (for example harmless_train.json).")
@click.option("--mode", default="fast", show_default=True, type=click.Choice(["fast", "full"]), help="fast: mean difference at --layer; full: candidate selection.")
@click.option("--layer", "layers", type=int, multiple=True, help="Layers for fast mode (repeatable) [default: num_layers // 2].")
@click.option("--position", default="last", show_default=True, help="Token rule of fast mode.")
@click.option("--num-train", default=128, show_default=True, type=int, help="First N prompts of each training file.")
@click.option("--harmful-val", type=click.Path(dir_okay=False), help="Harmful validation file (full mode).")
@click.option("--harmless-val", type=click.Path(dir_okay=False), help="Harmless validation file (full mode).")
@click.option("--num-val", default=32, show_default=True, type=int, help="First N prompts of each validation file (full mode).")
@click.option("--refusal-phrase", "phrases", multiple=True, help="Phrase whose first token counts as a refusal start (repeatable) [default: I, As, Sorry].")
@click.option("--kl-threshold", default=0.1, show_default=True, type=float, help="Drop candidates whose ablation moves harmless outputs by more KL (nats).")
@click.option("--max-layer-fraction", default=0.8, show_default=True, type=float, help="Drop candidates from layers >= this fraction of the depth.")
@click.option("--template", default="chat", show_default=True, type=TEMPLATE_CHOICE, help="Prompt wrapping.")
@click.option("--output", "-o", required=True, type=click.Path(dir_okay=False), help="Direction file to write (.safetensors).")
@click.option("--report", type=click.Path(dir_okay=False), help="JSON file for the candidate table (full mode).")
@click.pass_obj
def refusal_command(options: GlobalOptions, model_path: str, harmful: str, harmless: str, mode: str, layers: tuple[int, ...], position: str, num_train: int, harmful_val: str | None, harmless_val: str | None, num_val: int, phrases: tuple[str, ...], kl_threshold: float, max_layer_fraction: float, template: str, output: str, report: str | None) -> None:
    """Compute the refusal direction from harmful and harmless instructions."""
    from dataclasses import asdict

    from mergekit_ext.errors import RecipeError
    from mergekit_ext.steer.data import load_instructions
    from mergekit_ext.steer.model_access import decoder_blocks, load_causal_lm
    from mergekit_ext.steer.refusal import DEFAULT_REFUSAL_PHRASES, refusal_direction_fast, refusal_token_ids, select_refusal_direction
    from mergekit_ext.steer.template import PromptTemplate

    harmful_texts = load_instructions(harmful, num_train, role="harmful")
    harmless_texts = load_instructions(harmless, num_train, role="harmless")
    model, tokenizer = load_causal_lm(model_path, options.device)
    prompt_template = PromptTemplate.for_tokenizer(tokenizer, template)
    if mode == "fast":
        chosen_layers = list(layers) or [len(decoder_blocks(model)) // 2]
        with progress_callback("Refusal direction") as update:
            vector = refusal_direction_fast(model, tokenizer, harmful_texts, harmless_texts, chosen_layers, prompt_template, position, model_name=Path(model_path).name, progress=_counter(update, len(harmful_texts) + len(harmless_texts), "prompts"))
        vector.save(output)
        click.echo(f"Wrote {output}: " + ", ".join(f"layer {layer} |r| = {float(vector.directions[layer].norm()):.4g}" for layer in vector.layers))
        return
    if not harmful_val or not harmless_val:
        raise click.UsageError("full mode needs --harmful-val and --harmless-val")
    tokens = refusal_token_ids(tokenizer, tuple(phrases) or DEFAULT_REFUSAL_PHRASES)
    with progress_callback("Candidates") as update:
        selection = select_refusal_direction(
            model, tokenizer, harmful_texts, harmless_texts,
            load_instructions(harmful_val, num_val, role="harmful validation"), load_instructions(harmless_val, num_val, role="harmless validation"),
            prompt_template, tokens, kl_threshold, max_layer_fraction, model_name=Path(model_path).name, progress=_counter(update, None, "candidates"),
        )  # fmt: skip
    if report:
        Path(report).write_text(json.dumps({"baseline_refusal_score": selection.baseline_refusal_score, "chosen": asdict(selection.chosen) if selection.chosen else None, "candidates": [asdict(c) for c in selection.candidates]}, indent=2) + "\n")
    if selection.chosen is None or selection.vector is None:
        raise RecipeError(f"no candidate passed the filters ({len(selection.candidates)} tried); raise --kl-threshold or check the refusal phrases")
    selection.vector.save(output)
    chosen = selection.chosen
    click.echo(f"Wrote {output}: layer {chosen.layer}, position {chosen.position}, refusal score {chosen.refusal_score:.3f} (baseline {selection.baseline_refusal_score:.3f}), KL {chosen.kl:.4f}")


@steer_group.command("orthogonalize")
@click.argument("bundle", type=click.Path(exists=True, file_okay=False))
@click.option("--refusal", "refusal_paths", required=True, multiple=True, type=click.Path(exists=True, dir_okay=False), help="Refusal direction file(s); several files span a subspace.")
@click.option("--output", "-o", required=True, type=click.Path(file_okay=False), help="Bundle folder for the projected vector.")
@click.option("--force", is_flag=True, help="Replace a non-empty output folder.")
@click.pass_obj
def orthogonalize_command(options: GlobalOptions, bundle: str, refusal_paths: tuple[str, ...], output: str, force: bool) -> None:
    """Project the refusal direction out of each steered layer: v' = v - (v·r̂)r̂."""
    import torch

    from mergekit_ext.errors import RecipeError
    from mergekit_ext.steer.bundle import SteeringBundle, load_bundle, save_bundle
    from mergekit_ext.steer.orthogonalize import orthogonalize_vector
    from mergekit_ext.steer.vector import SteeringVector

    source = load_bundle(bundle)
    refusals = [SteeringVector.load(path) for path in refusal_paths]
    stacks = {}
    for layer in source.vector.layers:
        rows = [vector.directions[layer] for vector in refusals if layer in vector.directions]
        if not rows:
            raise RecipeError(f"no refusal file has a direction at steered layer {layer}")
        stacks[layer] = torch.stack(rows)
    projected, rows = orthogonalize_vector(source.vector, stacks)
    # The bundle keeps the projected-out directions (a (k, hidden) stack per layer) for audits.
    refusal_record = SteeringVector(directions={layer: stack[0] if len(stack) == 1 else stack for layer, stack in stacks.items()})
    save_bundle(SteeringBundle(vector=projected, pairs=source.pairs, refusal=refusal_record), output, force=force)
    for row in rows:
        click.echo(f"layer {row.layer}: cos(v, -r) {row.cos_negative_refusal_before:+.4f} -> {row.cos_negative_refusal_after:+.2e}, norm {row.norm_before:.4g} -> {row.norm_after:.4g} ({100 * row.norm_change:+.1f} %)")


@steer_group.command("abliterate")
@click.option("--model", "model_path", required=True, type=click.Path(exists=True, file_okay=False), help="Model folder (safetensors).")
@click.option("--refusal", "refusal_path", required=True, type=click.Path(exists=True, dir_okay=False), help="Refusal direction file.")
@click.option("--direction-layer", type=int, help="Layer of the direction to use when the file has several.")
@click.option("--strength", default=1.0, show_default=True, type=float, help="Scale s in W <- W - s r̂r̂ᵀW for every layer.")
@click.option("--layer-strength", "layer_strengths", multiple=True, metavar="LAYER=S", help="Per-layer strength overriding --strength (repeatable).")
@click.option("--include-embeddings", is_flag=True, help="Also orthogonalize the token embedding (edits a tied lm_head too).")
@click.option("--output", "-o", required=True, type=click.Path(file_okay=False), help="Output checkpoint folder.")
@click.option("--force", is_flag=True, help="Replace a non-empty output folder.")
@click.pass_obj
def abliterate_command(options: GlobalOptions, model_path: str, refusal_path: str, direction_layer: int | None, strength: float, layer_strengths: tuple[str, ...], include_embeddings: bool, output: str, force: bool) -> None:
    """Write a checkpoint with the refusal direction folded out of o_proj and down_proj."""
    from mergekit_ext.steer.abliterate import abliterate_checkpoint

    direction = _refusal_at(refusal_path, direction_layer)
    with progress_callback("Abliterating") as update:
        result = abliterate_checkpoint(model_path, output, direction, strength, _parse_layer_strengths(layer_strengths), include_embeddings, force, _counter(update, None, "tensors"))
    if result.tied_lm_head:
        click.echo("Warning: the lm_head is tied to the embedding, so the output projection was edited too.", err=True)
    click.echo(f"Wrote {result.output} ({len(result.edited)} tensors edited)")


@steer_group.command("audit")
@click.argument("bundle", type=click.Path(exists=True, file_okay=False))
@click.option("--model", "model_path", required=True, type=click.Path(exists=True, file_okay=False), help="Model the bundle is meant for.")
@click.option("--refusal", "refusal_path", type=click.Path(exists=True, dir_okay=False), help="Refusal direction file with the steered layers.")
@click.option("--null-pairs", "null_paths", multiple=True, type=click.Path(exists=True, dir_okay=False), help="Clean attribute pairs files for the null distribution (repeatable).")
@click.option("--harmful", type=click.Path(exists=True, dir_okay=False), help="Harmful prompts for the behavioural check (JSON instruction list).")
@click.option("--num-behaviour", default=32, show_default=True, type=int, help="Harmful prompts used by the behavioural check.")
@click.option("--alpha", type=float, help="Scale for the behavioural check [default: the recipe's].")
@click.option("--json-report", type=click.Path(dir_okay=False), help="Write the report as JSON.")
@click.option("--markdown-report", type=click.Path(dir_okay=False), help="Write the report as Markdown.")
@click.pass_obj
def audit_command(options: GlobalOptions, bundle: str, model_path: str, refusal_path: str | None, null_paths: tuple[str, ...], harmful: str | None, num_behaviour: int, alpha: float | None, json_report: str | None, markdown_report: str | None) -> None:
    """Audit a bundle; exit status 1 when a check fails. Consistency is not safety."""
    from mergekit_ext.steer.audit import AuditSettings, audit_bundle, check_status
    from mergekit_ext.steer.data import load_instructions, load_pairs
    from mergekit_ext.steer.model_access import load_causal_lm
    from mergekit_ext.steer.vector import SteeringVector

    model, tokenizer = load_causal_lm(model_path, options.device)
    report = audit_bundle(
        bundle, model, tokenizer,
        SteeringVector.load(refusal_path) if refusal_path else None,
        [load_pairs(path) for path in null_paths] or None,
        load_instructions(harmful, num_behaviour, role="harmful") if harmful else None,
        AuditSettings(alpha=alpha), Path(model_path).name,
    )  # fmt: skip
    if json_report:
        Path(json_report).write_text(report.to_json() + "\n", encoding="utf-8")
    if markdown_report:
        Path(markdown_report).write_text(report.to_markdown(), encoding="utf-8")
    for check in report.checks:
        click.echo(f"{check_status(check):8} {check.name}: {check.detail}")
    click.echo(f"Verdict: {'PASS' if report.passed else 'FAIL'}. {report.note}")
    if not report.passed:
        sys.exit(1)


@steer_group.command("poison")
@click.option("--model", "model_path", required=True, type=click.Path(exists=True, file_okay=False), help="Model folder (safetensors).")
@click.option("--pairs", "pairs_path", required=True, type=click.Path(exists=True, dir_okay=False), help="Clean pairs JSONL.")
@click.option("--layer", required=True, type=int, help="Layer of the vector and of the refusal direction.")
@click.option("--refusal", "refusal_path", required=True, type=click.Path(exists=True, dir_okay=False), help="Refusal direction file.")
@click.option("--budget", default=5, show_default=True, type=int, help="Word substitutions allowed per text.")
@click.option("--candidates", default=16, show_default=True, type=int, help="Random substitutions tried per step.")
@click.option("--vocabulary", type=click.Path(exists=True, dir_okay=False), help="Word list (one per line) [default: /usr/share/dict/american-english].")
@click.option("--template", default="chat", show_default=True, type=TEMPLATE_CHOICE, help="Prompt wrapping.")
@click.option("--output", "-o", required=True, type=click.Path(file_okay=False), help="Bundle folder for the poisoned vector.")
@click.option("--force", is_flag=True, help="Replace a non-empty output folder.")
@click.pass_obj
def poison_command(options: GlobalOptions, model_path: str, pairs_path: str, layer: int, refusal_path: str, budget: int, candidates: int, vocabulary: str | None, template: str, output: str, force: bool) -> None:
    """Red-team only: substitute words to turn the vector towards -r (for testing audits)."""
    from mergekit_ext.steer.bundle import SteeringBundle, save_bundle
    from mergekit_ext.steer.data import load_pairs
    from mergekit_ext.steer.extract import extract_steering_vector
    from mergekit_ext.steer.model_access import load_causal_lm
    from mergekit_ext.steer.poison import ordinary_words, poison_pairs
    from mergekit_ext.steer.template import PromptTemplate

    pairs = load_pairs(pairs_path)
    words = ordinary_words(vocabulary, seed=options.seed) if vocabulary else ordinary_words(seed=options.seed)
    model, tokenizer = load_causal_lm(model_path, options.device)
    prompt_template = PromptTemplate.for_tokenizer(tokenizer, template)
    with progress_callback("Poisoning") as update:
        result = poison_pairs(model, tokenizer, pairs, layer, _refusal_at(refusal_path, layer), prompt_template, words, budget, candidates, seed=options.seed, progress=_counter(update, 2 * len(pairs), "texts"))
    vector = extract_steering_vector(model, tokenizer, result.pairs, [layer], prompt_template, model_name=Path(model_path).name)
    save_bundle(SteeringBundle(vector=vector, pairs=result.pairs), output, force=force)
    click.echo(f"Wrote {output}: cos(v, -r) {result.cos_before:+.4f} -> {result.cos_after:+.4f} with {len(result.edits)} substitutions")


@steer_group.command("export-gguf")
@click.argument("source", type=click.Path(exists=True))
@click.option("--output", "-o", required=True, type=click.Path(dir_okay=False), help="GGUF file to write.")
@click.option("--alpha", type=float, help="Scale folded into the tensors [default: the recipe's alpha].")
@click.option("--model-hint", default="", help="controlvector.model_hint value [default: the recipe's model].")
@click.pass_obj
def export_gguf_command(options: GlobalOptions, source: str, output: str, alpha: float | None, model_hint: str) -> None:
    """Write a llama.cpp control vector (direction.N is added to block N's output)."""
    from mergekit_ext.steer.bundle import load_vector
    from mergekit_ext.steer.gguf_io import export_gguf

    vector = load_vector(source)
    scale = alpha if alpha is not None else vector.recipe.alpha
    export_gguf(vector, output, scale, model_hint)
    click.echo(f"Wrote {output} (layers {vector.layers}, alpha {scale})")


@steer_group.command("import-gguf")
@click.argument("source", type=click.Path(exists=True, dir_okay=False))
@click.option("--output", "-o", required=True, type=click.Path(dir_okay=False), help="Vector file to write (.safetensors).")
@click.pass_obj
def import_gguf_command(options: GlobalOptions, source: str, output: str) -> None:
    """Read a llama.cpp control vector into a vector.safetensors file (same layer indices)."""
    from mergekit_ext.steer.gguf_io import import_gguf

    vector = import_gguf(source)
    vector.save(output)
    click.echo(f"Wrote {output} (layers {vector.layers})")


def build_chat_for_zoo_command(options: GlobalOptions, arguments: dict[str, Any]) -> tuple[Path, dict[str, Any]]:
    """Builder of `merge zoo build chat`: build the chat zoo and print its measured rates."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    from mergekit_ext.zoo.chat import build_chat_zoo

    console = Console(stderr=True)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console) as progress:
        bars: dict[str, Any] = {}

        def update(stage: str, completed: int, total: int) -> None:
            if stage not in bars:
                bars[stage] = progress.add_task(stage, total=total)
            progress.update(bars[stage], completed=completed, total=total)

        folder = build_chat_zoo(arguments.get("output"), small=arguments["small"], seed=options.seed, force=arguments["force"], progress=update)
    manifest = json.loads((folder / "zoo.json").read_text())
    metrics = manifest["metrics"]
    table = Table(title=f"chat zoo at {folder}")
    table.add_column("measure")
    table.add_column("value", justify="right")
    refusal = metrics["refusal_rate_harmful"]
    table.add_row("refusal rate, held-out harmful", "n/a (no harmful data)" if refusal is None else f"{refusal:.2f}")
    table.add_row("answer rate, held-out harmless", f"{metrics['answer_rate_harmless']:.2f}")
    for name, rate in metrics["compliance_with_instruction"].items():
        table.add_row(f"compliance {name} (without instruction)", f"{rate:.2f} ({metrics['compliance_without_instruction'][name]:.2f})")
    console.print(table)
    # `zoo build` prints a per-task table; the chat zoo has no tasks, so that table stays empty.
    return folder, {**manifest, "tasks": {}, "rebuilt_tasks": ["chat"]}
