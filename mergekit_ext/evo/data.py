"""Loaders for math benchmarks in the Qwen2.5-Math JSONL format.

Supported names: gsm8k, math500, aime24, minerva_math (copied into
`mergekit_ext/evo/benchmarks/`), or any JSONL path whose rows have a
question (`question` or `problem`) and a gold answer (`answer`, `gt`, or a
`solution` with a `\\boxed{...}` answer). GSM8K answers end with `#### N`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from mergekit_ext.errors import RecipeError

BENCHMARK_FOLDER = Path(__file__).parent / "benchmarks"
BENCHMARK_NAMES = ("gsm8k", "math500", "aime24", "minerva_math")


@dataclass(frozen=True)
class MathProblem:
    """One benchmark item: a stable id, the question and the gold answer."""

    id: str
    question: str
    answer: str


def last_boxed_content(text: str) -> str | None:
    """Return the content of the last `\\boxed{...}` in `text`, braces balanced."""
    start = text.rfind("\\boxed")
    if start < 0:
        return None
    opening = text.find("{", start)
    if opening < 0:
        return None
    depth = 0
    for position in range(opening, len(text)):
        if text[position] == "{":
            depth += 1
        elif text[position] == "}":
            depth -= 1
            if depth == 0:
                return text[opening + 1 : position]
    return None


def _gold_answer(row: dict, path: Path, line_number: int) -> str:
    if "gt" in row:
        return str(row["gt"])
    if "answer" in row:
        answer = str(row["answer"])
        # GSM8K: the worked solution ends with "#### <number>".
        if "####" in answer:
            answer = answer.split("####")[-1].strip().replace(",", "")
        return answer
    if "solution" in row:
        boxed = last_boxed_content(str(row["solution"]))
        if boxed is not None:
            return boxed
    raise RecipeError(
        f"{path}:{line_number}: no gold answer; expected an `answer` or `gt` field, or a `solution` with \\boxed{{}}."
    )


def resolve_benchmark_path(name_or_path: str, data_dir: Path | None = None) -> Path:
    """Return the JSONL file for a benchmark name or a path."""
    if name_or_path in BENCHMARK_NAMES:
        folder = Path(data_dir) if data_dir is not None else BENCHMARK_FOLDER
        path = folder / f"{name_or_path}.jsonl"
    else:
        path = Path(name_or_path)
    if not path.is_file():
        raise RecipeError(
            f"Benchmark file {path} not found; give one of {', '.join(BENCHMARK_NAMES)} or a JSONL path."
        )
    return path


def load_benchmark(name_or_path: str, data_dir: Path | None = None, limit: int | None = None) -> list[MathProblem]:
    """Load a benchmark by name (see module docstring) or from a JSONL path."""
    path = resolve_benchmark_path(name_or_path, data_dir)
    source = path.stem
    problems: list[MathProblem] = []
    with path.open(encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise RecipeError(f"{path}:{line_number}: invalid JSON ({error}).") from error
            question = row.get("question") or row.get("problem")
            if not question:
                raise RecipeError(f"{path}:{line_number}: missing `question` or `problem` field.")
            identifier = row.get("unique_id") or row.get("id") or row.get("idx") or line_number - 1
            problems.append(
                MathProblem(id=f"{source}/{identifier}", question=question, answer=_gold_answer(row, path, line_number))
            )
            if limit is not None and len(problems) >= limit:
                break
    return problems
