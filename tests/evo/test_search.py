"""Search loop: constraint, memoization, archive, checkpoint and resume."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mergekit_ext.evo.archive import Archive, hypervolume
from mergekit_ext.evo.config import parse_config
from mergekit_ext.evo.fitness import CandidateResult, ItemResult
from mergekit_ext.evo.search import ARCHIVE_FILE, Search, prepare_run_dir
from mergekit_ext.evo.data import MathProblem

PROBLEMS = [MathProblem(id=f"p{i}", question=str(i), answer=str(i)) for i in range(10)]


class FormulaBackend:
    """Deterministic stand-in for decoding: more weight on the short model gives shorter, less accurate outputs."""

    candidates_per_batch = 1

    def __init__(self, fail_after: int | None = None) -> None:
        self.calls = 0
        self.fail_after = fail_after
        self.keys: list[str] = []

    def evaluate(self, genomes, problems, progress=None):
        results = []
        for genome in genomes:
            if self.fail_after is not None and self.calls >= self.fail_after:
                raise KeyboardInterrupt("simulated kill")
            self.calls += 1
            self.keys.append(genome.key())
            weight = float(np.mean(genome.genes))
            correct_count = round(len(problems) * (1.0 - 0.8 * weight**2))
            tokens = 100.0 * (1.0 - weight) + 10.0
            items = tuple(
                ItemResult(id=p.id, correct=i < correct_count, num_tokens=int(tokens), truncated=False, prediction="")
                for i, p in enumerate(problems)
            )
            results.append(CandidateResult(correct_count / len(problems), float(int(tokens)), 0, items))
        return results


def _config(**search):
    return parse_config({
        "search_space": {"base_model": "/unused/long", "models": ["/unused/short"], "weights": "layer_groups",
                         "layer_groups": 2},
        "data": {"problems": "gsm8k"},
        "generation": {"max_new_tokens": 200},
        "search": {"population": 6, "generations": 4, **search},
    })  # fmt: skip


def _archive_rows(run_dir):
    rows = [json.loads(line) for line in (run_dir / ARCHIVE_FILE).read_text().splitlines()]
    for row in rows:
        row.pop("seconds")
    return rows


def test_resume_after_kill_gives_identical_archive(tmp_path):
    config = _config()
    reference_dir = tmp_path / "reference"
    prepare_run_dir(reference_dir, resume=False)
    reference_backend = FormulaBackend()
    Search(config, reference_dir, reference_backend, PROBLEMS).run()

    killed_dir = tmp_path / "killed"
    prepare_run_dir(killed_dir, resume=False)
    # Kill in the middle of generation 2 (after 6 + 6 + 3 evaluations, fewer if duplicates were removed).
    with pytest.raises(KeyboardInterrupt):
        Search(config, killed_dir, FormulaBackend(fail_after=15), PROBLEMS).run()
    evaluated_before_kill = len(Archive(killed_dir / ARCHIVE_FILE).entries)

    resumed_backend = FormulaBackend()
    Search(config, killed_dir, resumed_backend, PROBLEMS).run(resume=True)

    assert _archive_rows(killed_dir) == _archive_rows(reference_dir)
    # Nothing archived before the kill was decoded again.
    assert resumed_backend.calls == reference_backend.calls - evaluated_before_kill
    assert (killed_dir / "front.json").read_text() == (reference_dir / "front.json").read_text()


def test_archive_memoizes_duplicates(tmp_path):
    prepare_run_dir(tmp_path / "run", resume=False)
    backend = FormulaBackend()
    search = Search(_config(), tmp_path / "run", backend, PROBLEMS)
    genes = np.array([[0.1, 0.2, 0.3], [0.1, 0.2, 0.3], [0.5, 0.5, 0.5]])
    first, _ = search.evaluate_population(genes)
    second, _ = search.evaluate_population(genes)
    assert backend.calls == 2
    np.testing.assert_array_equal(first, second)
    np.testing.assert_array_equal(first[0], first[1])


def test_accuracy_floor_sets_constraint_and_filters_front(tmp_path):
    config = _config(accuracy_floor=0.7)
    prepare_run_dir(tmp_path / "run", resume=False)
    search = Search(config, tmp_path / "run", FormulaBackend(), PROBLEMS)
    objectives, constraints = search.evaluate_population(np.array([[0.0, 0.0, 0.0], [0.9, 0.9, 0.9]]))
    # weight 0: 10/10 correct; weight 0.9: round(10 * (1 - 0.648)) = 4 correct.
    np.testing.assert_allclose(objectives[:, 0], [-1.0, -0.4])
    np.testing.assert_allclose(constraints[:, 0], [0.7 - 1.0, 0.7 - 0.4])
    front = search.archive.front(0.7)
    assert [entry.result.accuracy for entry in front] == [1.0]


def test_front_with_floor_after_search_is_feasible(tmp_path):
    config = _config(accuracy_floor=0.6)
    prepare_run_dir(tmp_path / "run", resume=False)
    front = Search(config, tmp_path / "run", FormulaBackend(), PROBLEMS).run()
    assert front
    assert all(entry.result.accuracy >= 0.6 for entry in front)


def test_hypervolume_of_two_points():
    # Points (-0.8, 50) and (-0.5, 20) with max_tokens 100, reference (0, 1):
    # area = 0.8 * (1 - 0.5) + 0.5 * (0.5 - 0.2) = 0.55.
    assert hypervolume([(-0.8, 50.0), (-0.5, 20.0)], 100.0) == pytest.approx(0.55)


def test_initial_population_is_on_grid(tmp_path):
    prepare_run_dir(tmp_path / "run", resume=False)
    backend = FormulaBackend()
    config = _config(generations=1)
    Search(config, tmp_path / "run", backend, PROBLEMS).run()
    genes = np.array([[float(g) for g in key.split(",")] for key in backend.keys])
    np.testing.assert_allclose(genes, np.round(genes, 1), atol=1e-9)
