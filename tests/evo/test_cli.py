"""`merge evo` end to end on tiny models: search, resume, report, export."""

from __future__ import annotations

import json

import yaml
from click.testing import CliRunner
from safetensors.torch import load_file

from mergekit_ext.cli.main import cli


def _write_config(path, tiny_models, problem_file):
    config = {
        "search_space": {"base_model": str(tiny_models["long"]), "models": [str(tiny_models["short"])]},
        "data": {"problems": str(problem_file), "limit": 3},
        "generation": {"max_new_tokens": 4},
        "search": {"population": 4, "generations": 2},
        "backend": "population",
        "candidates_per_batch": 4,
    }
    path.write_text(yaml.safe_dump(config))
    return path


def test_search_report_export(tiny_models, problem_file, tmp_path):
    config = _write_config(tmp_path / "search.yaml", tiny_models, problem_file)
    run_dir = tmp_path / "run"
    runner = CliRunner()
    result = runner.invoke(cli, ["--device", "cpu", "evo", "search", str(config), "--output", str(run_dir)])
    assert result.exit_code == 0, result.output
    for name in ("run.json", "archive.jsonl", "front.json", "pareto.png", "checkpoint", "parents.json"):
        assert (run_dir / name).is_file(), name
    archive_lines = (run_dir / "archive.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in archive_lines]
    assert all(len(row["items"]) == 3 for row in rows)

    # Resuming a finished run evaluates nothing new.
    result = runner.invoke(cli, ["--device", "cpu", "evo", "search", "--resume", str(run_dir)])
    assert result.exit_code == 0, result.output
    assert (run_dir / "archive.jsonl").read_text().splitlines() == archive_lines

    result = runner.invoke(cli, ["evo", "report", str(run_dir)])
    assert result.exit_code == 0, result.output
    assert "accuracy" in result.output

    result = runner.invoke(cli, ["--device", "cpu", "evo", "export", str(run_dir), "--front"])
    assert result.exit_code == 0, result.output
    front = json.loads((run_dir / "front.json").read_text())["members"]
    member = run_dir / "export" / "member-00"
    card = (member / "README.md").read_text()
    assert "Evolutionary merge search" in card
    assert f"{front[0]['genes'][0]:.6f}" in card
    weights = load_file(member / "model.safetensors")
    base = load_file(tiny_models["long"] / "model.safetensors")
    short = load_file(tiny_models["short"] / "model.safetensors")
    name = "model.layers.0.mlp.up_proj.weight"
    weight = front[0]["genes"][0]
    expected = base[name] + weight * (short[name] - base[name])
    assert (weights[name] - expected).abs().max() < 1e-6

    result = runner.invoke(
        cli,
        ["--device", "cpu", "evo", "export", str(run_dir), "--front", "--force",
         "--push", "my-org/l2s", "--layout", "branches", "--dry-run"],
    )
    assert result.exit_code == 0, result.output
    assert "my-org/l2s" in result.output
    assert "member-00" in result.output
    assert "README.md" in result.output


def test_search_refuses_existing_run_folder(tiny_models, problem_file, tmp_path):
    config = _write_config(tmp_path / "search.yaml", tiny_models, problem_file)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "other.txt").write_text("x")
    result = CliRunner().invoke(cli, ["evo", "search", str(config), "--output", str(tmp_path / "run")])
    assert result.exit_code == 2
    assert "exists and is not empty" in result.output
