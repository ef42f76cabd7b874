"""Contrastive pairs and instruction lists: loading, validation and hashing."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from mergekit_ext.errors import RecipeError


@dataclass(frozen=True)
class ContrastivePair:
    """One pair of texts: `positive` shows the attribute, `negative` does not."""

    positive: str
    negative: str


def _parse_pair(row: object, path: Path, line_number: int) -> ContrastivePair:
    if not isinstance(row, dict):
        raise RecipeError(f"{path}:{line_number}: expected a JSON object, got {type(row).__name__}")
    if "positive" in row or "negative" in row:
        keys = ("positive", "negative")
    elif "prompt" in row or "prompt_without_instruction" in row:
        keys = ("prompt", "prompt_without_instruction")
    else:
        raise RecipeError(
            f"{path}:{line_number}: a pair needs the fields positive/negative or prompt/prompt_without_instruction; "
            f"found {sorted(row)}"
        )
    values = [row.get(key) for key in keys]
    for key, value in zip(keys, values):
        if not isinstance(value, str):
            raise RecipeError(f"{path}:{line_number}: field {key!r} is missing or not a string")
        if not value.strip():
            raise RecipeError(f"{path}:{line_number}: field {key!r} is empty")
    if values[0] == values[1]:
        raise RecipeError(f"{path}:{line_number}: the two texts of the pair are identical, so the pair carries no contrast")
    return ContrastivePair(positive=values[0], negative=values[1])


def load_pairs(path: str | Path) -> list[ContrastivePair]:
    """Read contrastive pairs from JSONL (`positive`/`negative` or `prompt`/`prompt_without_instruction`)."""
    source = Path(path)
    if not source.is_file():
        raise RecipeError(f"pairs file {source} not found")
    pairs: list[ContrastivePair] = []
    with source.open(encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                raise RecipeError(f"{source}:{line_number}: empty line; remove it (one JSON object per line)")
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise RecipeError(f"{source}:{line_number}: invalid JSON ({error.msg})") from error
            pairs.append(_parse_pair(row, source, line_number))
    if not pairs:
        raise RecipeError(f"pairs file {source} is empty")
    return pairs


def write_pairs(pairs: list[ContrastivePair], path: str | Path) -> None:
    """Write pairs as JSONL with the fields `positive` and `negative`."""
    with Path(path).open("w", encoding="utf-8") as handle:
        for pair in pairs:
            handle.write(json.dumps({"positive": pair.positive, "negative": pair.negative}, ensure_ascii=False) + "\n")


def hash_pairs(pairs: list[ContrastivePair]) -> str:
    """Return the SHA-256 of the pairs in a canonical JSON form."""
    canonical = json.dumps([[pair.positive, pair.negative] for pair in pairs], ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def load_instructions(path: str | Path, limit: int | None = None, role: str = "instruction") -> list[str]:
    """Read a JSON list of `{"instruction", "category"}` objects (the refusal-direction split format).

    The evaluation files of the same release use the key `prompt`; it is accepted too.
    `role` only names the file's purpose in error messages (for example "harmful").
    """
    source = Path(path)
    if not source.is_file():
        raise RecipeError(
            f"{role} instruction file {source} not found; pass a JSON list of "
            '{"instruction": ..., "category": ...} objects (for example harmful_train.json)'
        )
    try:
        rows = json.loads(source.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise RecipeError(f"{source}: invalid JSON ({error.msg})") from error
    if not isinstance(rows, list) or not rows:
        raise RecipeError(f"{source}: expected a non-empty JSON list of instruction objects")
    instructions: list[str] = []
    for index, row in enumerate(rows):
        text = row.get("instruction", row.get("prompt")) if isinstance(row, dict) else None
        if not isinstance(text, str) or not text.strip():
            raise RecipeError(f"{source}: item {index} has no non-empty 'instruction' (or 'prompt') string")
        instructions.append(text)
    return instructions[:limit] if limit is not None else instructions


def sha256_file(path: str | Path) -> str:
    """Return the SHA-256 hex digest of a file."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
