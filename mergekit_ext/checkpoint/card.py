"""Model cards (`README.md`) written into every output folder.

A card starts with Hugging Face Hub metadata (YAML front matter: `base_model`,
`base_model_relation`, `tags`, `library_name`, `license`) and records the method,
parameters, inputs with their SHA-256, seed and tool version. Inputs are named by
their Hub repo id when known and by their folder name otherwise, so a card never
contains a local path.

Besides `ModelCard` for classic merges, this module builds the cards of an Evo-L2S
front member (`evo_member_card`), of the summary of a whole front
(`front_summary_card`) and of a MASS artifact (`mass_artifact_card`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import Any

import yaml

from mergekit_ext import __version__

FRONT_MATTER = re.compile(r"\A---\n(.*?)\n---\n", re.DOTALL)

# A Hub repo id: "namespace/name" with letters, digits, "-", "_" and "." (no "..",
# no leading or trailing "-" or "."), as huggingface_hub's `validate_repo_id` accepts.
REPO_ID = re.compile(r"\A[A-Za-z0-9](?:[\w.-]*[A-Za-z0-9])?/[A-Za-z0-9](?:[\w.-]*[A-Za-z0-9])?\Z")

# Folder name of a repo snapshot in the huggingface_hub cache: models--ORG--NAME/snapshots/<commit>.
HF_CACHE_FOLDER = re.compile(r"\Amodels--(?P<namespace>[^/]+?)--(?P<name>[^/]+)\Z")

PROJECT_URL = "https://pypi.org/project/mergekit-ext/"
SHARDED_DIGEST_NOTE = (
    "The SHA-256 of a sharded checkpoint is that of its shard files read one after another, "
    "in the order its index first names them (in file-name order without an index)."
)


def is_repo_id(text: str) -> bool:
    """Return whether `text` has the form of a Hub repo id (`org/name`)."""
    return bool(REPO_ID.match(text)) and ".." not in text and "--" not in text


@dataclass(frozen=True)
class CardInput:
    """An input of a merge as the card names it."""

    name: str
    sha256: str
    role: str = "model"  # "base" or "model"
    repo_id: str | None = None

    @property
    def hub_name(self) -> str:
        """Return the repo id when known, else `name` when it has the form `org/name`, else the last part of `name`."""
        if self.repo_id:
            return self.repo_id
        if is_repo_id(self.name):
            return self.name
        return PurePath(self.name).name or self.name


def hub_id_of(folder: str | Path) -> str | None:
    """Return the Hub repo id a local checkpoint folder came from, if it records one.

    Looks at the huggingface_hub cache layout (`models--ORG--NAME/snapshots/...`) and
    then at `_name_or_path` in `config.json` when it has the form `org/name`.
    """
    folder = Path(folder)
    for part in (folder, *folder.parents):
        match = HF_CACHE_FOLDER.match(part.name)
        if match:
            return f"{match['namespace']}/{match['name']}"
    config_path = folder / "config.json"
    if config_path.is_file():
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return None
        name = config.get("_name_or_path") if isinstance(config, dict) else None
        # NOTE: a relative local path such as "models/base" has the same form as a repo id,
        # so it is taken as one. transformers writes the Hub id here for downloaded models.
        if isinstance(name, str) and is_repo_id(name):
            return name
    return None


def card_input_for(folder: str | Path, sha256: str, role: str = "model") -> CardInput:
    """Build the card entry of a local input folder, with its Hub repo id when one is recorded."""
    folder = Path(folder)
    return CardInput(name=folder.name, sha256=sha256, role=role, repo_id=hub_id_of(folder))


@dataclass
class ModelCard:
    """Contents of a model card; `render` turns them into Markdown."""

    title: str
    method: str
    inputs: list[CardInput]
    parameters: dict[str, Any] = field(default_factory=dict)
    seed: int | None = None
    license: str | None = None
    library_name: str = "transformers"
    extra_tags: list[str] = field(default_factory=list)
    extra_sections: list[tuple[str, str]] = field(default_factory=list)
    summary: str | None = None  # first paragraph; a default sentence names the tool and method
    reproduce: str | None = None  # body of "Reproducing"; None: the text for `merge run`

    def metadata(self) -> dict[str, Any]:
        """Return the Hub front matter as a dict."""
        metadata: dict[str, Any] = {}
        base_models = _unique(item.hub_name for item in self.inputs)
        if base_models:
            metadata["base_model"] = base_models
            # The Hub shows the model under "Merges" of each base model with this relation.
            metadata["base_model_relation"] = "merge"
        metadata["tags"] = _unique(["merge", "mergekit-ext", self.method, *self.extra_tags])
        metadata["library_name"] = self.library_name
        if self.license:
            metadata["license"] = self.license
        return metadata

    def render(self) -> str:
        """Return the card as Markdown with Hub front matter."""
        lines = ["---", yaml.safe_dump(self.metadata(), sort_keys=False, allow_unicode=True).rstrip(), "---", ""]
        lines += [f"# {self.title}", ""]
        lines += [
            self.summary
            or (
                f"This model was produced with [mergekit-ext]({PROJECT_URL}) {__version__} "
                f"using the `{self.method}` merge method."
            ),
            "",
            "## Merge details",
            "",
            f"- **Method:** `{self.method}`",
            f"- **Tool:** mergekit-ext {__version__}",
        ]
        if self.seed is not None:
            lines.append(f"- **Seed:** `{self.seed}`")

        lines += ["", "### Inputs", "", "| role | model | SHA-256 of the weights |", "|---|---|---|"]
        for item in self.inputs:
            lines.append(f"| {item.role} | {_cell(item.hub_name)} | {_sha_cell(item.sha256)} |")
        lines += ["", SHARDED_DIGEST_NOTE]
        lines += ["", "### Parameters", "", "```yaml"]
        lines.append(
            yaml.safe_dump({"merge_method": self.method, **self.parameters}, sort_keys=False, allow_unicode=True).rstrip()
        )
        lines += ["```", ""]

        for heading, body in self.extra_sections:
            lines += [f"## {heading}", "", body.rstrip(), ""]
        lines += [
            "## Reproducing",
            "",
            self.reproduce
            or (
                "The exact recipe is in `merge_recipe.yaml`; run it with "
                f"`merge{'' if self.seed is None else f' --seed {self.seed}'} run merge_recipe.yaml "
                "--output OUT`. Its model entries are the paths this merge read; on another "
                "machine, point them at copies of the same inputs (the SHA-256 digests above "
                "identify them)."
            ),
            "",
        ]
        return "\n".join(lines)


def license_of(folder: Path) -> str | None:
    """Return the `license` from the front matter of `folder/README.md`, if any."""
    metadata = read_front_matter(folder / "README.md")
    value = metadata.get("license") if metadata else None
    return str(value) if value else None


def read_front_matter(readme: Path) -> dict[str, Any] | None:
    """Return the YAML front matter of a card as a dict, or None when it has none or is invalid."""
    if not readme.is_file():
        return None
    match = FRONT_MATTER.match(readme.read_text(encoding="utf-8", errors="replace"))
    if not match:
        return None
    try:
        metadata = yaml.safe_load(match.group(1)) or {}
    except yaml.YAMLError:
        return None
    return metadata if isinstance(metadata, dict) else None


# --- Evo-L2S front members -------------------------------------------------------------


@dataclass(frozen=True)
class EvoMember:
    """One member of a Pareto front.

    `objectives` contains the values as a reader expects them (for example accuracy 0.497
    and mean generated tokens 1655), not pymoo's minimized signs. `repo_id` and
    `revision` are set once the member is published, so that cards can link to it.
    """

    index: int
    genome: Mapping[str, float]
    objectives: Mapping[str, float]
    repo_id: str | None = None
    revision: str | None = None

    @property
    def url(self) -> str | None:
        """Return the Hub address of the published member, or None before publishing."""
        if not self.repo_id:
            return None
        base = f"https://huggingface.co/{self.repo_id}"
        return f"{base}/tree/{self.revision}" if self.revision and self.revision != "main" else base


@dataclass(frozen=True)
class EvoFront:
    """The Pareto front a member came from, and the search that produced it."""

    run_name: str
    members: Sequence[EvoMember]
    objective_goals: Mapping[str, str] = field(default_factory=dict)  # name -> "max" or "min"
    algorithm: str = "NSGA-II"
    generations: int | None = None
    population: int | None = None
    evaluated: int | None = None  # genomes evaluated over the whole run
    hypervolume: float | None = None
    settings: Mapping[str, Any] = field(default_factory=dict)  # further search settings, shown as YAML


def evo_member_card(
    member: EvoMember,
    front: EvoFront,
    inputs: Sequence[CardInput],
    *,
    method: str,
    parameters: Mapping[str, Any] | None = None,
    seed: int | None = None,
    license: str | None = None,
    title: str | None = None,
    evaluation: Sequence[Mapping[str, Any]] = (),
) -> ModelCard:
    """Build the card of one Evo-L2S front member; call `.render()` for the Markdown.

    `parameters` are the merge parameters the genome decodes to; `evaluation` contains one
    row per benchmark (column name -> value), shown as a table.
    """
    objective_rows = [
        {"objective": name, "value": value, "goal": front.objective_goals.get(name, "")}
        for name, value in member.objectives.items()
    ]
    search = (
        f"This model is member {member.index} of the {len(front.members)}-member Pareto front of the "
        f"Evo-L2S run `{front.run_name}` ({front.algorithm}). Evo-L2S searches merge coefficients for "
        "the trade-off between accuracy and generated length (long-to-short reasoning); no member of "
        "the front is better than another in every objective.\n\n"
        + markdown_table(objective_rows)
        + "\n\n### Genome\n\n```yaml\n"
        + yaml.safe_dump(dict(member.genome), sort_keys=False).rstrip()
        + "\n```"
    )
    sections = [("Evo-L2S search", search), ("Pareto front", _front_section(front, highlight=member.index))]
    if evaluation:
        sections.append(("Evaluation", markdown_table(evaluation)))
    return ModelCard(
        title=title or f"{front.run_name} front member {member.index}",
        method=method,
        inputs=list(inputs),
        parameters=dict(parameters or {}),
        seed=seed,
        license=license,
        extra_tags=["evo-l2s", "pareto-front"],
        extra_sections=sections,
        summary=(
            f"A Pareto-front member of an Evo-L2S search, produced with [mergekit-ext]({PROJECT_URL}) "
            f"{__version__} using the `{method}` merge method."
        ),
        reproduce=(
            "Run `merge_recipe.yaml` with `merge run merge_recipe.yaml --output OUT` after pointing "
            "the model entries at the same inputs; the genome above decodes to that recipe."
        ),
    )


def front_summary_card(
    front: EvoFront,
    inputs: Sequence[CardInput],
    *,
    license: str | None = None,
    title: str | None = None,
) -> str:
    """Return the Markdown of a collection-style card that links every member of a front."""
    card = ModelCard(
        title=title or f"{front.run_name}: Pareto front",
        method="evo-l2s",
        inputs=list(inputs),
        license=license,
        extra_tags=["pareto-front"],
    )
    lines = ["---", yaml.safe_dump(card.metadata(), sort_keys=False, allow_unicode=True).rstrip(), "---", ""]
    lines += [f"# {card.title}", ""]
    lines += [
        f"The {len(front.members)} members of the Pareto front of the Evo-L2S run `{front.run_name}` "
        f"({front.algorithm}), each published as its own model. Produced with "
        f"[mergekit-ext]({PROJECT_URL}) {__version__}.",
        "",
        "## Members",
        "",
        _front_section(front, highlight=None),
        "",
        "### Inputs",
        "",
        "| role | model | SHA-256 of the weights |",
        "|---|---|---|",
    ]
    for item in inputs:
        lines.append(f"| {item.role} | {_cell(item.hub_name)} | {_sha_cell(item.sha256)} |")
    lines.append("")
    return "\n".join(lines)


def _front_section(front: EvoFront, highlight: int | None) -> str:
    rows = []
    for member in front.members:
        label = f"[{member.index}]({member.url})" if member.url else str(member.index)
        if member.index == highlight:
            label = f"**{label} (this model)**"
        rows.append({"member": label, **dict(member.objectives), **dict(member.genome)})
    details: dict[str, Any] = {"algorithm": front.algorithm}
    for key in ("generations", "population", "evaluated", "hypervolume"):
        value = getattr(front, key)
        if value is not None:
            details[key] = value
    if front.objective_goals:
        details["objectives"] = dict(front.objective_goals)
    details.update(dict(front.settings))
    return markdown_table(rows) + "\n\n```yaml\n" + yaml.safe_dump(details, sort_keys=False).rstrip() + "\n```"


# --- MASS artifacts --------------------------------------------------------------------

# library_name on the Hub for each MASS model kind: the library that loads the shared model.
MASS_LIBRARIES = {
    "hf-encoder": "transformers",
    "hf-clip-vision": "transformers",
    "causal-lm": "transformers",
    "open-clip": "open_clip",
}


def mass_artifact_card(
    config: Mapping[str, Any] | Any,
    inputs: Sequence[CardInput],
    *,
    license: str | None = None,
    title: str | None = None,
    repo_id: str | None = None,
    evaluation: Sequence[Mapping[str, Any]] = (),
) -> ModelCard:
    """Build the card of a MASS artifact from its `MassConfig` (or that model's dict).

    `repo_id` fills the loading example (a placeholder otherwise); `evaluation` contains one
    row per task (column name -> value), shown as a table.
    """
    data = config.model_dump() if hasattr(config, "model_dump") else dict(config)
    tasks = list(data["task_names"])
    router = dict(data["router"])
    storage = dict(data["storage"])
    total = storage["shared_bytes"] + storage["factor_bytes"] + storage.get("head_bytes", 0)
    storage_factor = total / storage["one_model_bytes"]

    if data.get("rank") is not None:
        rank = str(data["rank"])
    elif data.get("rank_fraction") is not None:
        rank = f"⌊{data['rank_fraction']} · min(m, n)⌋ per matrix"
    else:
        rank = f"⌊min(m, n) / {len(tasks)}⌋ per matrix (min(m, n) divided by the number of tasks)"
    parameters: dict[str, Any] = {
        "tasks": tasks,
        "rank": data.get("rank"),
        "rank_fraction": data.get("rank_fraction"),
        "alpha": data.get("alpha", 1.0),
        "svd_method": data.get("svd_method", "full"),
        "redundancy_epsilon": data.get("redundancy_epsilon"),
        "router": router,
    }
    parameters = {key: value for key, value in parameters.items() if value is not None}

    artifact = "\n".join(
        [
            f"MASS keeps, for each of the {len(tasks)} tasks, the top singular components of its task "
            "vector beside one shared merged model (TSV-M of all tasks). At inference a data-free "
            "router picks the tasks of each input from the residual of a hidden state against each "
            "task's subspace, and a second pass runs the model merged from the picked tasks.",
            "",
            "| | |",
            "|---|---|",
            f"| tasks | {_cell(', '.join(tasks))} |",
            f"| rank per task | {_cell(rank)} |",
            f"| model kind | {data.get('model_kind', '')} |",
            f"| task heads | {'yes' if data.get('has_heads') else 'no'} |",
        ]
    )
    router_rows = [
        {"setting": "block", "value": router.get("layer")},
        {"setting": "hooked module (input)", "value": f"`{router.get('site')}`"},
        {"setting": "token rule", "value": router.get("token_rule")},
        {"setting": "threshold", "value": router.get("threshold")},
        {"setting": "top-k", "value": router.get("top_k")},
        {"setting": "temperature", "value": router.get("temperature")},
        {"setting": "mode", "value": router.get("mode")},
    ]
    storage_parts = [
        ("shared model", storage["shared_bytes"]),
        ("per-task factors", storage["factor_bytes"]),
        ("task heads", storage.get("head_bytes", 0)),
        ("total", total),
        ("one model", storage["one_model_bytes"]),
    ]
    storage_rows = [{"part": part, "size": format_bytes(size), "bytes": size} for part, size in storage_parts]
    storage_text = (
        markdown_table(storage_rows)
        + f"\n\nStorage factor: **{storage_factor:.2f}×** one model."
    )
    load_id = repo_id or "ORG/NAME"
    load = (
        "The shared model alone loads with its library as any checkpoint. Routing needs "
        "mergekit-ext (`pip install mergekit-ext`):\n\n```python\n"
        "from huggingface_hub import snapshot_download\n"
        "from mergekit_ext.mass import MassModel\n\n"
        f'model = MassModel.from_pretrained(snapshot_download("{load_id}"))\n```'
    )
    if repo_id is None:
        load += "\n\nReplace `ORG/NAME` with the id of this repository."
    sections = [("MASS artifact", artifact), ("Router", markdown_table(router_rows)), ("Storage", storage_text)]
    if evaluation:
        sections.append(("Evaluation", markdown_table(evaluation)))
    sections.append(("How to load", load))
    return ModelCard(
        title=title or f"MASS merge of {len(tasks)} tasks",
        method="mass",
        inputs=list(inputs),
        parameters=parameters,
        seed=data.get("seed"),
        license=license,
        library_name=MASS_LIBRARIES.get(str(data.get("model_kind")), "transformers"),
        extra_tags=["tsv-m", "router"],
        extra_sections=sections,
        summary=(
            f"A MASS artifact (subspace merging with a data-free router) built with "
            f"[mergekit-ext]({PROJECT_URL}) {__version__}: one shared model plus per-task "
            "low-rank factors and a router, run as two-pass inference."
        ),
        reproduce="Rebuild the artifact with `merge mass` on the same inputs and the parameters above.",
    )


# --- Markdown helpers ------------------------------------------------------------------


def markdown_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Return `rows` as a Markdown table; the columns are the union of the keys, in first-seen order."""
    columns = _unique(key for row in rows for key in row)
    lines = ["| " + " | ".join(_cell(column) for column in columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(_cell(_format(row.get(column, ""))) for column in columns) + " |")
    return "\n".join(lines)


def format_bytes(size: int) -> str:
    """Return `size` in decimal units (kB, MB, GB), as the Hub shows file sizes."""
    value = float(size)
    for unit in ("B", "kB", "MB", "GB"):
        if value < 1000:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1000
    return f"{value:.2f} TB"


def _format(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return "" if value is None else str(value).lower()
    if isinstance(value, float):
        return f"{value:.0f}" if abs(value) >= 1000 else f"{value:.4g}"
    return str(value)


def _sha_cell(sha256: str) -> str:
    return f"`{sha256}`" if sha256 else "not recorded"


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _unique(items: Any) -> list[Any]:
    seen: dict[Any, None] = {}
    for item in items:
        seen.setdefault(item, None)
    return list(seen)
