"""`merge demo --small`: the README's main job on the small text zoo, and reuse of its merges."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

from mergekit_ext.cli.main import cli
from mergekit_ext.mass.demo import run_demo


def test_demo_on_small_zoo_then_reuses_merges(small_text_zoo, tmp_path: Path) -> None:
    zoo_dir, manifest = small_text_zoo
    work = tmp_path / "demo"
    arguments = ["--device", "cpu", "demo", "--small", "--zoo-dir", str(zoo_dir), "--work-dir", str(work)]
    first = CliRunner().invoke(cli, arguments)
    assert first.exit_code == 0, first.output
    for row in ("fine-tuned (own task)", "task arithmetic", "TIES", "TSV-M", "MASS", "MASS top-1"):
        assert row in first.output
    for task in manifest["tasks"]:
        assert task in first.output
    assert "MASS storage:" in first.output
    assert "two-pass" in first.output
    assert "Reused" not in first.output
    for name in ("task_arithmetic", "ties", "mass"):
        assert (work / f"{name}.stamp.json").is_file()

    again = run_demo(small=True, zoo_dir=zoo_dir, work_dir=work, latency=False)
    assert again.reused == {"task arithmetic": True, "TIES": True, "MASS": True}
    rows = {row.method: row for row in again.rows}
    # Same merged weights, same evaluation: the same accuracies.
    assert f"{rows['TSV-M'].normalized:.3f}" in first.output
    assert f"{rows['MASS'].normalized:.3f}" in first.output
    assert 1.0 < again.storage_factor < 2.5
