"""The archive of evaluated genomes (`archive.jsonl`) and the Pareto front over it.

Every evaluated genome is appended as one JSON line, flushed at once, so a
killed run loses at most the line being written. The archive doubles as the
memo: greedy decoding is deterministic, so a genome already in it is never
evaluated again.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mergekit_ext.evo.fitness import CandidateResult

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ArchiveEntry:
    """One evaluated genome."""

    key: str
    genes: tuple[float, ...]
    generation: int
    result: CandidateResult
    seconds: float
    # Set when every evaluation attempt failed (Ray backend); `result` then holds the worst objectives.
    error: str | None = None

    def objectives(self) -> tuple[float, float]:
        """Return the minimized objectives (-accuracy, mean tokens)."""
        return (-self.result.accuracy, self.result.mean_tokens)

    def to_json(self) -> str:
        row = {
            "key": self.key,
            "genes": list(self.genes),
            "generation": self.generation,
            "seconds": round(self.seconds, 4),
            **self.result.to_dict(),
        }
        if self.error is not None:
            row["error"] = self.error
        return json.dumps(row)

    @classmethod
    def from_json(cls, line: str) -> ArchiveEntry:
        row = json.loads(line)
        return cls(
            key=row["key"],
            genes=tuple(row["genes"]),
            generation=int(row["generation"]),
            result=CandidateResult.from_dict(row),
            seconds=float(row.get("seconds", 0.0)),
            error=row.get("error"),
        )


class Archive:
    """Append-only archive file plus an in-memory index by genome key."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.entries: dict[str, ArchiveEntry] = {}
        if path.is_file():
            lines = path.read_text(encoding="utf-8").splitlines()
            for number, line in enumerate(lines, start=1):
                if not line.strip():
                    continue
                try:
                    entry = ArchiveEntry.from_json(line)
                except (json.JSONDecodeError, KeyError) as error:
                    # A run killed while writing leaves a partial last line; it is evaluated again.
                    if number == len(lines):
                        logger.warning("Ignoring the incomplete last line of %s (%s)", path, error)
                        self._rewrite_without_last_line(lines[:-1])
                        continue
                    raise
                self.entries[entry.key] = entry

    def _rewrite_without_last_line(self, lines: list[str]) -> None:
        self.path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")

    def __contains__(self, key: str) -> bool:
        return key in self.entries

    def get(self, key: str) -> ArchiveEntry | None:
        return self.entries.get(key)

    def add(self, entry: ArchiveEntry) -> None:
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(entry.to_json() + "\n")
            handle.flush()
        self.entries[entry.key] = entry

    def front(self, accuracy_floor: float | None = None) -> list[ArchiveEntry]:
        """Return the non-dominated feasible entries, sorted by mean tokens."""
        entries = [
            entry
            for entry in self.entries.values()
            if (accuracy_floor is None or entry.result.accuracy >= accuracy_floor) and entry.error is None
        ]
        return sorted(pareto_front(entries), key=lambda entry: (entry.result.mean_tokens, -entry.result.accuracy))


def pareto_front(entries: list[ArchiveEntry]) -> list[ArchiveEntry]:
    """Return the entries no other entry dominates on (-accuracy, mean tokens).

    Of several entries with equal objectives only the first (in archive order) is kept.
    """
    if not entries:
        return []
    objectives = np.array([entry.objectives() for entry in entries])
    front = []
    seen: set[tuple[float, float]] = set()
    for index, point in enumerate(objectives):
        dominated = np.any(np.all(objectives <= point, axis=1) & np.any(objectives < point, axis=1))
        if not dominated and tuple(point) not in seen:
            seen.add(tuple(point))
            front.append(entries[index])
    return front


def hypervolume(points: list[tuple[float, float]], max_tokens: float) -> float:
    """Hypervolume of (-accuracy, mean tokens / max_tokens) points against reference (0, 1)."""
    from pymoo.indicators.hv import HV

    if not points:
        return 0.0
    normalized = np.array([[f1, f2 / max_tokens] for f1, f2 in points])
    return float(HV(ref_point=np.array([0.0, 1.0]))(normalized))
