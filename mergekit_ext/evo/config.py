"""The YAML configuration of an evolutionary merge search.

Model paths may be written `zoo://reasoning/long` (or `zoo://reasoning-small/...`)
for the cached reasoning zoo; relative paths resolve against the YAML file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from mergekit_ext.errors import RecipeError
from mergekit_ext.evo.generation import GenerationSettings
from mergekit_ext.evo.genome import SearchSpace

ZOO_SCHEME = "zoo://"


class DataSettings(BaseModel):
    """Problems the fitness uses."""

    model_config = ConfigDict(extra="forbid")

    # Benchmark name (gsm8k, math500, aime24, minerva_math) or JSONL path.
    problems: str
    # Optional JSON file written by `merge evo subset`: its `ids` select the problems.
    subset: str | None = None
    # Keep the first N problems (after the subset), None for all.
    limit: int | None = Field(None, ge=1)
    # Problems for measuring front members after the search (for example a test split).
    test_problems: str | None = None


class AlgorithmSettings(BaseModel):
    """pymoo algorithm and operators; defaults follow the Evo-L2S runs."""

    model_config = ConfigDict(extra="forbid")

    algorithm: Literal["nsga2", "smsemoa", "agemoea"] = "nsga2"
    population: int = Field(20, ge=2)
    generations: int = Field(10, ge=1)
    seed: int = 42
    crossover_eta: float = 15.0
    crossover_probability: float = 0.9
    mutation_eta: float = 20.0
    # Initial genes are drawn on this grid (0 disables rounding).
    initial_grid: float = Field(0.1, ge=0.0)
    # Constraint: accuracy >= floor, as G = floor - accuracy <= 0. None disables it.
    accuracy_floor: float | None = Field(None, ge=0.0, le=1.0)


class EvoConfig(BaseModel):
    """A complete search: space, data, decoding, algorithm and backend."""

    model_config = ConfigDict(extra="forbid")

    search_space: SearchSpace
    data: DataSettings
    generation: GenerationSettings = Field(default_factory=GenerationSettings)
    search: AlgorithmSettings = Field(default_factory=AlgorithmSettings)
    backend: Literal["sequential", "population"] = "sequential"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    # Candidates decoded together by the population backend.
    candidates_per_batch: int = Field(8, ge=1)


def resolve_model_path(value: str, relative_to: Path | None) -> str:
    """Resolve `zoo://NAME/MODEL` and relative paths to an absolute folder path."""
    if value.startswith(ZOO_SCHEME):
        from mergekit_ext.zoo.reasoning import reasoning_zoo_folder

        name, _, model = value[len(ZOO_SCHEME) :].partition("/")
        if name not in ("reasoning", "reasoning-small"):
            raise RecipeError(f"Unknown zoo {name!r} in {value}; use zoo://reasoning/... or zoo://reasoning-small/...")
        folder = reasoning_zoo_folder(small=name.endswith("-small"))
        if not (folder / "zoo.json").is_file():
            flag = " --small" if name.endswith("-small") else ""
            raise RecipeError(f"Zoo folder {folder} not found; build it with `merge zoo build reasoning{flag}`.")
        return str(folder / model)
    path = Path(value).expanduser()
    if not path.is_absolute() and relative_to is not None and not path.exists():
        path = relative_to / path
    return str(path)


def load_config(path: str | Path) -> EvoConfig:
    """Load and validate a search YAML; errors name the file and the key."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RecipeError(f"Search configuration {path} not found.") from None
    except yaml.YAMLError as error:
        raise RecipeError(f"{path}: invalid YAML: {error}") from error
    return parse_config(data, source=str(path), relative_to=path.parent)


def parse_config(data: object, source: str = "config", relative_to: Path | None = None) -> EvoConfig:
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: a search configuration must be a YAML mapping.")
    try:
        config = EvoConfig.model_validate(data)
    except ValidationError as error:
        first = error.errors()[0]
        key = ".".join(str(part) for part in first["loc"])
        raise RecipeError(f"{source}: invalid value at '{key}': {first['msg']}") from error
    space = config.search_space
    resolved_space = space.model_copy(
        update={
            "base_model": resolve_model_path(space.base_model, relative_to),
            "models": [resolve_model_path(model, relative_to) for model in space.models],
        }
    )
    data_settings = config.data
    updates = {}
    for key in ("problems", "subset", "test_problems"):
        value = getattr(data_settings, key)
        if value is not None and (value.startswith(ZOO_SCHEME) or (relative_to is not None and "/" in value)):
            updates[key] = resolve_model_path(value, relative_to)
    return config.model_copy(update={"search_space": resolved_space, "data": data_settings.model_copy(update=updates)})
