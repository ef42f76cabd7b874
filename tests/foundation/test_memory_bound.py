"""Peak memory of a merge does not grow with the number of layers."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from mergekit_ext.tiny import write_tiny_checkpoint

MERGE_SCRIPT = """
import sys
from pathlib import Path
from mergekit_ext.engine import MergeOptions, peak_rss_bytes, run_recipe
from mergekit_ext.recipe import parse_recipe
base, first, second, out = sys.argv[1:]
recipe = parse_recipe({"merge_method": "ties", "base_model": base,
                       "models": [{"model": first}, {"model": second}], "parameters": {"density": 0.5}})
run_recipe(recipe, MergeOptions(output=Path(out)))
print(peak_rss_bytes())
"""


def peak_rss_of_merge(tmp_path: Path, num_layers: int) -> tuple[int, int]:
    folders = [
        write_tiny_checkpoint(tmp_path / f"L{num_layers}-{index}", seed=index, num_layers=num_layers, hidden=256, vocab_size=256)
        for index in range(3)
    ]
    input_bytes = sum((folder / "model.safetensors").stat().st_size for folder in folders)
    result = subprocess.run(
        [sys.executable, "-c", MERGE_SCRIPT, *map(str, folders), str(tmp_path / f"out{num_layers}")],
        check=True,
        capture_output=True,
        text=True,
    )
    return int(result.stdout.strip().splitlines()[-1]), input_bytes


def test_peak_memory_independent_of_depth(tmp_path: Path) -> None:
    small_peak, small_inputs = peak_rss_of_merge(tmp_path, 2)
    large_peak, large_inputs = peak_rss_of_merge(tmp_path, 40)
    extra_inputs = large_inputs - small_inputs
    assert extra_inputs > 250_000_000
    # Loading whole models would add about extra_inputs bytes; streaming adds almost nothing.
    assert large_peak - small_peak < 0.25 * extra_inputs, (small_peak, large_peak, extra_inputs)
