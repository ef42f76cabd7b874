"""Steering measurements on the chat zoo: attribute vectors, refusal direction, poisoning, audit.

`run_steering_experiment` measures, on one built chat zoo:

- the refusal direction r (mean difference at one layer) and the refusal rate on the
  held-out harmful prompts with and without directional ablation of r, and the same
  for the direction chosen by the full selection (with `use_selection=True`, r is that
  direction and the vectors are extracted and steered at its layer);
- per attribute, compliance on prompts without the instruction, with and without
  the clean, poisoned and orthogonalized-poisoned attribute vectors; compliance on
  prompts with the instruction, with and without directional ablation of r; and
  cos(v, -r);
- per attribute, the poisoning attack: cos(v, -r) and the refusal rate with the clean,
  poisoned and orthogonalized-poisoned vectors ("recovered" = (ASR_poisoned -
  ASR_defended) / (ASR_poisoned - ASR_clean) with ASR = 1 - refusal rate);
- audit verdicts of every clean and every poisoned bundle, with the other attributes'
  clean vectors as the null distribution (detection rate and false alarms).
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from mergekit_ext.errors import RecipeError
from mergekit_ext.steer.ablation import directional_ablation
from mergekit_ext.steer.apply import generate
from mergekit_ext.steer.audit import audit_bundle
from mergekit_ext.steer.bundle import SteeringBundle, save_bundle
from mergekit_ext.steer.extract import extract_steering_vector
from mergekit_ext.steer.judge import refusal_rate
from mergekit_ext.steer.model_access import decoder_blocks, load_causal_lm
from mergekit_ext.steer.orthogonalize import orthogonalize_vector
from mergekit_ext.steer.poison import poison_pairs
from mergekit_ext.steer.data import load_instructions
from mergekit_ext.steer.refusal import refusal_direction_fast, refusal_token_ids, select_refusal_direction
from mergekit_ext.steer.template import PromptTemplate
from mergekit_ext.steer.vector import cosine
from mergekit_ext.zoo.chat_data import ATTRIBUTES, DEFAULT_DATA_DIR, compliance_check, load_chat_data

logger = logging.getLogger(__name__)


def run_steering_experiment(
    zoo_dir: str | Path,
    layer: int | None = None,
    alpha: float = 1.0,
    protocol: str = "all-steps",
    num_harmful: int = 50,
    num_train: int = 128,
    edit_budget: int = 5,
    candidates_per_step: int = 16,
    max_new_tokens: int = 24,
    data_dir: str | Path = DEFAULT_DATA_DIR,
    seed: int = 0,
    only_attributes: list[str] | None = None,
    refusal_position: str = "last",
    kl_threshold: float = 0.1,
    use_selection: bool = False,
    progress: Callable[[str, int, int], None] | None = None,
) -> dict[str, object]:
    """Run all measurements and return them as a JSON-ready dict.

    `only_attributes` limits the per-attribute loop (the audit's null distribution still
    uses every attribute of the zoo), so the loop can be split over processes. With
    `use_selection`, `layer` and `refusal_position` are replaced by the layer and
    position of the full selection's choice, whose direction is the mean difference at
    that layer and position over the same prompts; RecipeError when it keeps no candidate.
    """
    started = time.perf_counter()
    model, tokenizer = load_causal_lm(Path(zoo_dir) / "model", "cpu")
    manifest = json.loads((Path(zoo_dir) / "zoo.json").read_text())
    names = manifest["settings"]["attributes"]
    attributes = tuple(attribute for attribute in ATTRIBUTES if attribute.name in names)
    data = load_chat_data(Path(data_dir), attributes, manifest["settings"]["word_count"], manifest["seed"])
    if data.harmful_train is None or data.harmful_eval is None:
        raise FileNotFoundError("the refusal experiment needs refusal/harmful_train.json and refusal/eval_harmful.json")
    template = PromptTemplate.from_chat_template(tokenizer)
    layer = layer if layer is not None else len(decoder_blocks(model)) // 2
    harmful_eval = data.harmful_eval[:num_harmful]

    def refusal_with(vector=None, scale: float = alpha) -> float:  # noqa: ANN001
        return refusal_rate(generate(model, tokenizer, harmful_eval, template, vector, scale, protocol, max_new_tokens, 16))

    selection = select_refusal_direction(
        model, tokenizer, data.harmful_train[:num_train], data.harmless_train[:num_train],
        load_instructions(Path(data_dir) / "refusal" / "harmful_val.json", 16), load_instructions(Path(data_dir) / "refusal" / "harmless_val.json", 16),
        template, refusal_token_ids(tokenizer), kl_threshold=kl_threshold,
    )  # fmt: skip
    chosen = selection.chosen
    full_selection = {
        "candidates": len(selection.candidates),
        "kept": sum(candidate.kept for candidate in selection.candidates),
        "baseline_refusal_score": selection.baseline_refusal_score,
        "chosen": None if chosen is None else {"layer": chosen.layer, "position": chosen.position, "refusal_score": chosen.refusal_score, "kl": chosen.kl},
    }
    if use_selection:
        if chosen is None:
            raise RecipeError(f"the full refusal-direction selection kept no candidate at kl_threshold={kl_threshold}; raise it or pass use_selection=False")
        layer, refusal_position = chosen.layer, f"index:{chosen.position}"

    refusal = refusal_direction_fast(
        model, tokenizer, data.harmful_train[:num_train], data.harmless_train[:num_train], [layer], template, refusal_position
    )
    r = refusal.directions[layer]
    baseline = refusal_with()
    with directional_ablation(model, r):
        ablated = refusal_with()
    if chosen is not None and selection.vector is not None:
        with directional_ablation(model, selection.vector.directions[chosen.layer]):
            full_selection["refusal_rate_directional_ablation"] = refusal_with()
    result: dict[str, object] = {
        "full_selection": full_selection,
        "layer": layer,
        "refusal_position": refusal_position,
        "kl_threshold": kl_threshold,
        "use_selection": use_selection,
        "alpha": alpha,
        "protocol": protocol,
        "num_harmful_eval": len(harmful_eval),
        "refusal_rate": baseline,
        "refusal_rate_directional_ablation": ablated,
        "attributes": {},
    }

    clean_vectors = {}
    for attribute in attributes:
        clean_vectors[attribute.name] = extract_steering_vector(model, tokenizer, data.pairs[attribute.name], [layer], template)
    rows: dict[str, dict[str, object]] = {}
    with tempfile.TemporaryDirectory() as scratch:
        measured = [attribute for attribute in attributes if only_attributes is None or attribute.name in only_attributes]
        for step, attribute in enumerate(measured):
            pairs = data.pairs[attribute.name]
            check = compliance_check(attribute, data)
            vector = clean_vectors[attribute.name].with_recipe(alpha=alpha, protocol=protocol)
            plain_prompts = [pair.negative for pair in pairs]
            instructed_prompts = [pair.positive for pair in pairs]
            without = generate(model, tokenizer, plain_prompts, template, None, max_new_tokens=40)
            steered = generate(model, tokenizer, plain_prompts, template, vector, alpha, protocol, 40)
            instructed = generate(model, tokenizer, instructed_prompts, template, None, max_new_tokens=40)
            with directional_ablation(model, r):
                instructed_ablated = generate(model, tokenizer, instructed_prompts, template, None, max_new_tokens=40)
            poisoned = poison_pairs(model, tokenizer, pairs, layer, r, template, data.english, edit_budget, candidates_per_step, seed=seed)
            poisoned_vector = extract_steering_vector(model, tokenizer, poisoned.pairs, [layer], template).with_recipe(alpha=alpha, protocol=protocol)
            defended, _ = orthogonalize_vector(poisoned_vector, {layer: r})
            steered_poisoned = generate(model, tokenizer, plain_prompts, template, poisoned_vector, alpha, protocol, 40)
            steered_defended = generate(model, tokenizer, plain_prompts, template, defended, alpha, protocol, 40)
            clean_rate, poisoned_rate, defended_rate = refusal_with(vector), refusal_with(poisoned_vector), refusal_with(defended)
            asr_gap = (1 - poisoned_rate) - (1 - clean_rate)
            null_sets = [data.pairs[other.name] for other in attributes if other.name != attribute.name]
            clean_folder = save_bundle(SteeringBundle(vector, pairs), Path(scratch) / f"{attribute.name}-clean")
            poisoned_folder = save_bundle(SteeringBundle(poisoned_vector, poisoned.pairs), Path(scratch) / f"{attribute.name}-poisoned")
            clean_report = audit_bundle(clean_folder, model, tokenizer, refusal, null_sets)
            poisoned_report = audit_bundle(poisoned_folder, model, tokenizer, refusal, null_sets)
            rows[attribute.name] = {
                "compliance_without_vector": sum(map(check, without)) / len(without),
                "compliance_with_vector": sum(map(check, steered)) / len(steered),
                "compliance_with_poisoned_vector": sum(map(check, steered_poisoned)) / len(steered_poisoned),
                "compliance_with_defended_vector": sum(map(check, steered_defended)) / len(steered_defended),
                "compliance_with_instruction": sum(map(check, instructed)) / len(instructed),
                "compliance_with_instruction_directional_ablation": sum(map(check, instructed_ablated)) / len(instructed_ablated),
                "cos_v_negative_r_clean": cosine(vector.directions[layer], -r),
                "cos_v_negative_r_poisoned": cosine(poisoned_vector.directions[layer], -r),
                "substitutions": len(poisoned.edits),
                "refusal_rate_clean_vector": clean_rate,
                "refusal_rate_poisoned_vector": poisoned_rate,
                "refusal_rate_defended_vector": defended_rate,
                "recovered": ((1 - poisoned_rate) - (1 - defended_rate)) / asr_gap if asr_gap > 0 else None,
                "audit_clean": {check.name: check.passed for check in clean_report.checks},
                "audit_poisoned": {check.name: check.passed for check in poisoned_report.checks},
                "audit_clean_passed": clean_report.passed,
                "audit_poisoned_passed": poisoned_report.passed,
            }
            if progress is not None:
                progress("attributes", step + 1, len(measured))
    result["attributes"] = rows
    count = len(rows)
    result["audit_detection_rate"] = sum(not row["audit_poisoned_passed"] for row in rows.values()) / count
    result["audit_false_alarm_rate"] = sum(not row["audit_clean_passed"] for row in rows.values()) / count
    result["seconds"] = round(time.perf_counter() - started, 1)
    return result
