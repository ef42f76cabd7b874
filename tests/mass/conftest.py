"""Fixtures of the MASS tests: a tiny BERT base, three task models with heads, and their artifact."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
from tests.mass.mass_tiny_models import perturb_checkpoint, write_heads, write_tiny_bert

from mergekit_ext.mass.build import MassBuildOptions, build_mass_artifact


@dataclass(frozen=True)
class TinyMassSetup:
    """Paths of a tiny base, its task models and heads, and the artifact built from them."""

    base: Path
    models: list[Path]
    heads: list[Path]
    artifact: Path


@pytest.fixture(scope="session")
def tiny_mass(tmp_path_factory: pytest.TempPathFactory) -> TinyMassSetup:
    root = tmp_path_factory.mktemp("tiny_mass")
    base = write_tiny_bert(root / "base")
    models = [perturb_checkpoint(base, root / f"task{i}", seed=i + 1) for i in range(3)]
    heads = write_heads(root / "heads", 3, 32)
    artifact = root / "artifact"
    build_mass_artifact(
        base, models, artifact, task_names=["first", "second", "third"], heads=heads,
        options=MassBuildOptions(device="cpu", router_layer=2),
    )  # fmt: skip
    return TinyMassSetup(base=base, models=models, heads=heads, artifact=artifact)
