"""User tasks for the text zoo from JSONL files, given on the command line or in YAML.

YAML form:

    tasks:
      - name: sentiment
        jsonl: data/sentiment.jsonl   # relative paths resolve against the YAML file
        max_length: 64                # optional, tokens
        max_per_class: 400            # optional
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from mergekit_ext.errors import RecipeError
from mergekit_ext.zoo.text_tasks import TextTask, jsonl_task


class UserTaskConfig(BaseModel):
    """One user task of a YAML task file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    jsonl: Path
    max_length: int = Field(default=64, ge=4, le=512)
    max_per_class: int = Field(default=400, ge=1)


class UserTasksConfig(BaseModel):
    """The whole YAML task file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    tasks: list[UserTaskConfig]


def tasks_from_files(pairs: Sequence[tuple[str, Path]]) -> list[TextTask]:
    """Define one task per (name, JSONL path) pair; the file must exist."""
    tasks = []
    for name, path in pairs:
        if not path.is_file():
            raise RecipeError(f"Task file {path} for task {name} not found. Pass an existing JSONL file.")
        tasks.append(jsonl_task(name, path))
    return tasks


def load_text_tasks_config(path: str | Path) -> list[TextTask]:
    """Read user tasks from a YAML file."""
    path = Path(path)
    try:
        config = UserTasksConfig.model_validate(yaml.safe_load(path.read_text(encoding="utf-8")))
    except (yaml.YAMLError, ValidationError) as error:
        raise RecipeError(f"Invalid task file {path}: {error}") from error
    tasks = []
    for entry in config.tasks:
        data = entry.jsonl if entry.jsonl.is_absolute() else path.parent / entry.jsonl
        if not data.is_file():
            raise RecipeError(f"{path}: task {entry.name} names {data}, which is not found.")
        tasks.append(jsonl_task(entry.name, data, entry.max_length, entry.max_per_class))
    return tasks
