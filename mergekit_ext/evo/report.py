"""Front table and Pareto plot of a search run.

The plot shows accuracy against length reduction relative to the base model
(the long model in the Evo-L2S setting): 100 * (1 - tokens / base tokens).
Parents come from `parents.json` (written by the search before generation 0).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from mergekit_ext.errors import RecipeError
from mergekit_ext.evo.archive import Archive
from mergekit_ext.evo.search import ARCHIVE_FILE, FRONT_FILE, PLOT_FILE, RUN_FILE

PARENTS_FILE = "parents.json"


@dataclass(frozen=True)
class FrontRow:
    """One row of the front table."""

    genes: tuple[float, ...]
    accuracy: float
    mean_tokens: float
    length_reduction: float | None  # percent against the base model, None without parents
    truncated: int


def load_parents(run_dir: Path) -> dict[str, dict]:
    path = Path(run_dir) / PARENTS_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def front_rows(run_dir: Path) -> list[FrontRow]:
    run_dir = Path(run_dir)
    if not (run_dir / RUN_FILE).is_file():
        raise RecipeError(f"{run_dir} is not a search run folder ({RUN_FILE} missing).")
    floor = json.loads((run_dir / RUN_FILE).read_text(encoding="utf-8"))["config"]["search"]["accuracy_floor"]
    front = Archive(run_dir / ARCHIVE_FILE).front(floor)
    base_tokens = load_parents(run_dir).get("base", {}).get("mean_tokens")
    rows = []
    for entry in front:
        reduction = None
        if base_tokens:
            reduction = 100.0 * (1.0 - entry.result.mean_tokens / base_tokens)
        rows.append(FrontRow(entry.genes, entry.result.accuracy, entry.result.mean_tokens, reduction,
                             entry.result.truncated))
    return rows


def plot_run(run_dir: Path, output: Path | None = None) -> Path:
    """Save the Pareto plot (all candidates, front, parents) and return its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    archive = Archive(run_dir / ARCHIVE_FILE)
    parents = load_parents(run_dir)
    base_tokens = parents.get("base", {}).get("mean_tokens")

    def x_of(tokens: float) -> float:
        return 100.0 * (1.0 - tokens / base_tokens) if base_tokens else tokens

    figure, axes = plt.subplots(figsize=(6, 4.5))
    entries = list(archive.entries.values())
    axes.scatter([x_of(e.result.mean_tokens) for e in entries], [100 * e.result.accuracy for e in entries],
                 s=12, color="0.7", label="evaluated")
    front = [FrontRow(r.genes, r.accuracy, r.mean_tokens, r.length_reduction, r.truncated) for r in front_rows(run_dir)]
    axes.plot([x_of(r.mean_tokens) for r in front], [100 * r.accuracy for r in front], "o-", color="C0",
              label="Pareto front")
    for name, marker in (("base", "s"), ("source_0", "^")):
        if name in parents:
            axes.scatter([x_of(parents[name]["mean_tokens"])], [100 * parents[name]["accuracy"]], marker=marker,
                         s=70, color="C3" if name == "base" else "C2", label=parents[name].get("label", name), zorder=3)
    axes.set_xlabel("length reduction vs base model (%)" if base_tokens else "mean generated tokens")
    axes.set_ylabel("accuracy (%)")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    target = Path(output) if output is not None else run_dir / PLOT_FILE
    figure.savefig(target, dpi=120)
    plt.close(figure)
    return target


def front_table(run_dir: Path) -> str:
    """Return the front as a plain-text table (genes, accuracy, tokens, reduction)."""
    rows = front_rows(run_dir)
    lines = [f"{'genes':<28} {'accuracy':>9} {'tokens':>9} {'reduction':>10} {'truncated':>9}"]
    for row in rows:
        genes = ", ".join(f"{gene:.3f}" for gene in row.genes)
        reduction = f"{row.length_reduction:.1f}%" if row.length_reduction is not None else "-"
        lines.append(f"{genes:<28} {100 * row.accuracy:>8.1f}% {row.mean_tokens:>9.1f} {reduction:>10} {row.truncated:>9}")
    front_file = Path(run_dir) / FRONT_FILE
    if front_file.is_file():
        volumes = json.loads(front_file.read_text(encoding="utf-8")).get("hypervolume_per_generation", [])
        lines.append("hypervolume per generation: " + ", ".join(f"{v:.4f}" for v in volumes))
    return "\n".join(lines)
