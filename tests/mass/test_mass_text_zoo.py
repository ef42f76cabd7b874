"""MASS end to end on the small text zoo: `merge mass`, then `merge eval` with the task unknown."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from mergekit_ext.cli.main import cli
from mergekit_ext.mass.evaluation import MassVariant, evaluate_mass_text_zoo, evaluate_mass_variants, measure_latency
from mergekit_ext.mass.runtime import MassModel
from mergekit_ext.zoo.evaluate import evaluate_text_zoo

# Measured on the small zoo (seed 0, 3 tasks): routing top-1 0.64 against 0.33 by chance,
# normalized accuracy 0.68 with the task unknown (TSV-M: 0.66). The floors leave room for
# differences of the zoo build across machines and torch versions.
ROUTING_FLOOR = 0.5
NORMALIZED_FLOOR = 0.55


def test_mass_on_small_text_zoo(small_text_zoo, tmp_path: Path) -> None:
    zoo_dir, manifest = small_text_zoo
    tasks = list(manifest["tasks"])
    artifact = tmp_path / "mass"
    arguments = ["--device", "cpu", "mass", "--base", str(zoo_dir / manifest["base_model"])]
    arguments += ["--models", *[str(zoo_dir / manifest["tasks"][t]["model"]) for t in tasks]]
    arguments += ["--heads", *[str(zoo_dir / manifest["tasks"][t]["head"]) for t in tasks]]
    arguments += ["--task-names", *tasks, "--output", str(artifact)]
    built = CliRunner().invoke(cli, arguments)
    assert built.exit_code == 0, built.output
    assert "storage factor" in built.output

    report = tmp_path / "eval.json"
    evaluated = CliRunner().invoke(cli, ["--device", "cpu", "eval", str(artifact), "--zoo-dir", str(zoo_dir), "--json", str(report)])
    assert evaluated.exit_code == 0, evaluated.output
    result = json.loads(report.read_text())
    assert result["accuracy"]["unknown_task"] is True
    assert [item["task"] for item in result["accuracy"]["tasks"]] == tasks
    assert result["routing"]["top1_accuracy"] >= ROUTING_FLOOR
    assert result["accuracy"]["average_normalized_accuracy"] >= NORMALIZED_FLOOR

    overrides = ["--router-rank", "2", "--token-rule", "content", "--mode", "top1", "--json", str(tmp_path / "top1.json")]
    evaluated = CliRunner().invoke(cli, ["--device", "cpu", "eval", str(artifact), "--zoo-dir", str(zoo_dir), *overrides])
    assert evaluated.exit_code == 0, evaluated.output
    settings = json.loads((tmp_path / "top1.json").read_text())["settings"]
    assert (settings["router_rank"], settings["token_rule"], settings["mode"]) == (2, "content", "top1")
    model_dir = zoo_dir / manifest["tasks"][tasks[0]]["model"]
    rejected = CliRunner().invoke(cli, ["eval", str(model_dir), "--zoo-dir", str(zoo_dir), "--router-rank", "2"])
    assert rejected.exit_code != 0
    assert "is not a MASS artifact" in rejected.output

    oracle = evaluate_mass_text_zoo(artifact, zoo_dir, oracle_head=True, device="cpu")
    assert oracle.accuracy.unknown_task is False
    assert oracle.accuracy.average_accuracy >= result["accuracy"]["average_accuracy"] - 1e-9

    # One shared pass 1 for several variants gives what separate evaluations give.
    model = MassModel.from_pretrained(artifact, device="cpu", cache_capacity=16)
    variants = [MassVariant("topk", "topk"), MassVariant("top1", "top1"), MassVariant("reuse", "topk", reuse_prefix=True)]
    shared = evaluate_mass_variants(model, zoo_dir, [*variants, MassVariant("tsv", shared_model=True)])
    # The shared model finished from pass 1 scores like the artifact loaded as a plain encoder.
    plain = evaluate_text_zoo(artifact, zoo_dir, unknown_task=True, device="cpu")
    assert [t.accuracy for t in shared["tsv"].accuracy.tasks] == [t.accuracy for t in plain.tasks]
    for variant in variants:
        alone = evaluate_mass_text_zoo(artifact, zoo_dir, mode=variant.mode, reuse_prefix=variant.reuse_prefix, device="cpu")
        assert [t.accuracy for t in shared[variant.label].accuracy.tasks] == [t.accuracy for t in alone.accuracy.tasks]
        assert shared[variant.label].routing.coverage == alone.routing.coverage
        assert shared[variant.label].routing.top1_accuracy == alone.routing.top1_accuracy
    assert shared["topk"].accuracy.average_accuracy == result["accuracy"]["average_accuracy"]

    latency = measure_latency(model, [["a noun gloss", "bonjour", "a quote about computers"]], repeats=1, with_reuse_prefix=True)
    assert latency.single_pass_seconds > 0
    assert latency.mass_seconds > 0
    assert latency.reuse_prefix_ratio is not None
    assert latency.reuse_prefix_ratio > 0
    assert model.reuse_prefix is False  # restored after timing
