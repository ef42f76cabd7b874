"""Model cards (`README.md`) written into every output folder.

A card starts with Hugging Face Hub metadata (YAML front matter) and records the
method, parameters, inputs with their SHA-256, seed and tool version. Inputs are named
by their Hub id when known and by their folder name otherwise: a card never contains
a local path.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mergekit_ext import __version__

FRONT_MATTER = re.compile(r"\A---\n(.*?)\n---\n", re.DOTALL)


@dataclass(frozen=True)
class CardInput:
    """An input of a merge as the card names it."""

    name: str
    sha256: str
    role: str = "model"  # "base" or "model"
    repo_id: str | None = None


@dataclass
class ModelCard:
    """What a model card says; `render` turns it into Markdown."""

    title: str
    method: str
    inputs: list[CardInput]
    parameters: dict[str, Any] = field(default_factory=dict)
    seed: int | None = None
    license: str | None = None
    library_name: str = "transformers"
    extra_tags: list[str] = field(default_factory=list)
    extra_sections: list[tuple[str, str]] = field(default_factory=list)

    def render(self) -> str:
        """Return the card as Markdown with Hub front matter."""
        metadata: dict[str, Any] = {
            "base_model": [item.repo_id or item.name for item in self.inputs],
            "tags": ["merge", "mergekit-ext", self.method, *self.extra_tags],
            "library_name": self.library_name,
        }
        if self.license:
            metadata["license"] = self.license
        lines = ["---", yaml.safe_dump(metadata, sort_keys=False).rstrip(), "---", ""]
        lines += [f"# {self.title}", ""]
        lines += [
            f"This model was produced with [mergekit-ext](https://pypi.org/project/mergekit-ext/) "
            f"{__version__} using the `{self.method}` merge method.",
            "",
            "## Merge details",
            "",
            "### Inputs",
            "",
            "| role | model | SHA-256 of the weights |",
            "|---|---|---|",
        ]
        for item in self.inputs:
            lines.append(f"| {item.role} | {item.repo_id or item.name} | `{item.sha256}` |")
        lines += ["", "### Parameters", "", "```yaml"]
        lines.append(yaml.safe_dump({"merge_method": self.method, **self.parameters}, sort_keys=False).rstrip())
        lines += ["```", ""]
        if self.seed is not None:
            lines += [f"Seed: `{self.seed}`", ""]
        for heading, body in self.extra_sections:
            lines += [f"## {heading}", "", body.rstrip(), ""]
        lines += [
            "## Reproducing",
            "",
            "The exact recipe is in `merge_recipe.yaml`; run it with `merge run merge_recipe.yaml "
            "--output OUT` after pointing the model entries at the same inputs.",
            "",
        ]
        return "\n".join(lines)


def license_of(folder: Path) -> str | None:
    """Return the `license` from the front matter of `folder/README.md`, if any."""
    readme = folder / "README.md"
    if not readme.exists():
        return None
    match = FRONT_MATTER.match(readme.read_text(encoding="utf-8", errors="replace"))
    if not match:
        return None
    try:
        metadata = yaml.safe_load(match.group(1)) or {}
    except yaml.YAMLError:
        return None
    value = metadata.get("license") if isinstance(metadata, dict) else None
    return str(value) if value else None
