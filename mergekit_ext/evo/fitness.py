"""Fitness of a candidate: accuracy and mean generated length on a problem set."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from mergekit_ext.evo.data import MathProblem
from mergekit_ext.evo.generation import Generation
from mergekit_ext.evo.grader import grade


@dataclass(frozen=True)
class ItemResult:
    """Outcome of one problem for one candidate."""

    id: str
    correct: bool
    num_tokens: int
    truncated: bool
    prediction: str


@dataclass(frozen=True)
class CandidateResult:
    """Objectives of one candidate and its per-item results."""

    accuracy: float
    mean_tokens: float
    truncated: int
    items: tuple[ItemResult, ...]

    def to_dict(self) -> dict:
        return {
            "accuracy": self.accuracy,
            "mean_tokens": self.mean_tokens,
            "truncated": self.truncated,
            "items": [asdict(item) for item in self.items],
        }

    @classmethod
    def from_dict(cls, data: dict) -> CandidateResult:
        return cls(
            accuracy=float(data["accuracy"]),
            mean_tokens=float(data["mean_tokens"]),
            truncated=int(data["truncated"]),
            items=tuple(ItemResult(**item) for item in data["items"]),
        )


def score(problems: list[MathProblem], generations: list[Generation]) -> CandidateResult:
    """Grade generations; mean length counts every item, truncated ones at the cap."""
    items = []
    for problem, generation in zip(problems, generations, strict=True):
        verdict = grade(generation.text, problem.answer)
        items.append(
            ItemResult(
                id=problem.id,
                correct=verdict.correct,
                num_tokens=generation.num_tokens,
                truncated=generation.truncated,
                prediction=verdict.prediction,
            )
        )
    count = max(1, len(items))
    return CandidateResult(
        accuracy=sum(item.correct for item in items) / count,
        mean_tokens=sum(item.num_tokens for item in items) / count,
        truncated=sum(item.truncated for item in items),
        items=tuple(items),
    )
