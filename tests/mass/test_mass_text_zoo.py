"""MASS end to end on the small text zoo: `merge mass`, then `merge eval` with the task unknown."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from mergekit_ext.cli.main import cli
from mergekit_ext.mass.evaluation import evaluate_mass_text_zoo

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

    oracle = evaluate_mass_text_zoo(artifact, zoo_dir, oracle_head=True, device="cpu")
    assert oracle.accuracy.unknown_task is False
    assert oracle.accuracy.average_accuracy >= result["accuracy"]["average_accuracy"] - 1e-9
