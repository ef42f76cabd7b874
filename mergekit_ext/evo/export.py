"""Export front members of a search run as merged checkpoints with the streaming engine."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from mergekit_ext.checkpoint.card import EvoFront, EvoMember
from mergekit_ext.engine import MergeOptions, run_recipe
from mergekit_ext.errors import RecipeError
from mergekit_ext.evo.archive import Archive, ArchiveEntry
from mergekit_ext.evo.config import parse_config
from mergekit_ext.evo.merge_memory import checkpoint_layers, genome_recipe
from mergekit_ext.evo.search import ARCHIVE_FILE, RUN_FILE
from mergekit_ext.hub import FrontPushPlan, push_front

logger = logging.getLogger(__name__)


def _card_section(entry: ArchiveEntry, gene_names: list[str], run_config: dict) -> str:
    genes = "\n".join(f"| {name} | {value:.6f} |" for name, value in zip(gene_names, entry.genes))
    search = run_config["search"]
    generation = run_config["generation"]
    return (
        "\n## Evolutionary merge search\n\n"
        "This checkpoint is a member of the Pareto front of an Evo-L2S search "
        "(accuracy against mean generated tokens).\n\n"
        "| gene | value |\n|---|---|\n" + genes + "\n\n"
        f"- accuracy on the search problems: {100 * entry.result.accuracy:.2f} %\n"
        f"- mean generated tokens: {entry.result.mean_tokens:.1f} "
        f"({entry.result.truncated} outputs hit the {generation['max_new_tokens']}-token cap)\n"
        f"- algorithm: {search['algorithm']}, population {search['population']}, "
        f"{search['generations']} generations, seed {search['seed']}, accuracy floor {search['accuracy_floor']}\n"
        f"- decoding: greedy, max {generation['max_new_tokens']} new tokens, "
        f"chat template {'on' if generation['use_chat_template'] else 'off'}\n"
    )


def export_front(
    run_dir: Path,
    output_dir: Path | None = None,
    dtype: str | None = None,
    device: str = "auto",
    force: bool = False,
    progress=None,
) -> list[Path]:
    """Write every front member to `<output_dir>/member-<i>` (default `<run_dir>/export`)."""
    run_dir = Path(run_dir)
    run_file = run_dir / RUN_FILE
    if not run_file.is_file():
        raise RecipeError(f"{run_dir} is not a search run folder ({RUN_FILE} missing).")
    stored = json.loads(run_file.read_text(encoding="utf-8"))
    config = parse_config(stored["config"], source=str(run_file))
    front = Archive(run_dir / ARCHIVE_FILE).front(config.search.accuracy_floor)
    if not front:
        raise RecipeError(f"The archive of {run_dir} is empty; run the search first.")
    output_dir = Path(output_dir) if output_dir is not None else run_dir / "export"
    output_dir.mkdir(parents=True, exist_ok=True)
    num_layers = checkpoint_layers(config.search_space.base_model)
    written = []
    for index, entry in enumerate(front):
        genome = config.search_space.decode(entry.genes)
        recipe = genome_recipe(genome, num_layers, dtype=dtype)
        target = output_dir / f"member-{index:02d}"
        report = run_recipe(recipe, MergeOptions(output=target, seed=config.search_space.merge_seed, device=device,
                                                 force=force))
        card = target / "README.md"
        section = _card_section(entry, config.search_space.gene_names(), stored["config"])
        card.write_text((card.read_text(encoding="utf-8") if card.is_file() else "") + section, encoding="utf-8")
        logger.info("Exported front member %d (%s) to %s", index, genome.key(), report.output)
        written.append(target)
        if progress is not None:
            progress(index + 1, len(front))
    return written


def front_summary(run_dir: Path) -> EvoFront:
    """Describe the Pareto front of a run (genomes, objectives, settings) for model cards."""
    run_dir = Path(run_dir)
    stored = json.loads((run_dir / RUN_FILE).read_text(encoding="utf-8"))
    config = parse_config(stored["config"], source=str(run_dir / RUN_FILE))
    archive = Archive(run_dir / ARCHIVE_FILE)
    front = archive.front(config.search.accuracy_floor)
    gene_names = config.search_space.gene_names()
    members = [
        EvoMember(
            index=index,
            genome=dict(zip(gene_names, entry.genes)),
            objectives={"accuracy": entry.result.accuracy, "mean_tokens": entry.result.mean_tokens},
        )
        for index, entry in enumerate(front)
    ]
    return EvoFront(
        run_name=run_dir.name,
        members=members,
        objective_goals={"accuracy": "max", "mean_tokens": "min"},
        algorithm=config.search.algorithm,
        generations=config.search.generations,
        population=config.search.population,
        evaluated=len(archive.entries),
    )


def push_exported_front(
    run_dir: Path,
    member_dirs: list[Path],
    prefix: str,
    layout: str = "repos",
    *,
    private: bool = False,
    dry_run: bool = False,
) -> FrontPushPlan:
    """Push exported front members of a run to the Hub, one repo or one branch per member."""
    return push_front(
        member_dirs,
        prefix,
        layout,  # type: ignore[arg-type]
        front=front_summary(run_dir),
        private=private,
        dry_run=dry_run,
    )
