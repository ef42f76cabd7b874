"""The Ray backend on a local 2-CPU cluster: same archive as in-process, lost actors, failures, resume."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml
from click.testing import CliRunner

pytest.importorskip(
    "ray", reason="the Ray backend tests need ray (pip install 'mergekit-ext[dist]')", exc_type=ImportError
)

from mergekit_ext.cli.main import cli  # noqa: E402
from mergekit_ext.evo.archive import Archive  # noqa: E402
from mergekit_ext.evo.config import load_config  # noqa: E402
from mergekit_ext.evo.ray_backend import RayBackend  # noqa: E402
from mergekit_ext.evo.ray_cluster import RaySettings  # noqa: E402
from mergekit_ext.evo.runner import load_problems  # noqa: E402
from mergekit_ext.evo.search import ARCHIVE_FILE, FRONT_FILE, Search, prepare_run_dir  # noqa: E402
from tests.evo_ray import faulty_workers  # noqa: E402

MAX_NEW_TOKENS = 6


@pytest.fixture(scope="module")
def search_config(tiny_models, problem_file, tmp_path_factory):
    """Two generations of four candidates on three problems, sequential backend.

    Every odd token id stops decoding, so that output lengths differ between
    candidates (the random models never emit their eos token).
    """
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_models["long"])
    special = set(tokenizer.all_special_tokens)
    vocabulary = tokenizer.get_vocab()
    stop_tokens = sorted(token for token, index in vocabulary.items() if index % 2 == 1 and token not in special)
    path = tmp_path_factory.mktemp("config") / "search.yaml"
    config = {
        "search_space": {"base_model": str(tiny_models["long"]), "models": [str(tiny_models["short"])],
                         "weights": "layer_groups", "layer_groups": 2},
        "data": {"problems": str(problem_file), "limit": 3},
        "generation": {"max_new_tokens": MAX_NEW_TOKENS, "stop_tokens": stop_tokens},
        "search": {"population": 4, "generations": 2},
        "backend": "sequential",
    }  # fmt: skip
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def reference_run(search_config, tmp_path_factory):
    """The same search with the in-process backend, through the CLI."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    result = CliRunner().invoke(
        cli, ["--device", "cpu", "evo", "search", str(search_config), "--output", str(run_dir), "--threads", "1"]
    )
    assert result.exit_code == 0, result.output
    return run_dir


@pytest.fixture(autouse=True)
def no_injected_faults(fault_folder):
    """Each test starts without fault files."""
    for path in fault_folder.iterdir():
        path.unlink()
    yield


def archive_rows(run_dir):
    """Archive lines as dicts, without the timing field."""
    rows = [json.loads(line) for line in (run_dir / ARCHIVE_FILE).read_text().splitlines()]
    for row in rows:
        row.pop("seconds")
    return rows


def run_search_with(backend, config_path, run_dir, resume=False, progress=None):
    config = load_config(config_path)
    if not resume:
        prepare_run_dir(run_dir, resume=False)
    return Search(config, run_dir, backend, load_problems(config), progress).run(resume=resume)


def test_cluster_listens_on_loopback(ray_cluster):
    assert ray_cluster.get_runtime_context().gcs_address.startswith("127.0.0.1:")


def test_cli_ray_backend_matches_in_process(ray_cluster, search_config, reference_run, tmp_path):
    run_dir = tmp_path / "run"
    result = CliRunner().invoke(
        cli, ["--device", "cpu", "evo", "search", str(search_config), "--output", str(run_dir), "--backend", "ray",
              "--ray-actors", "2"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output

    reference_rows = archive_rows(reference_run)
    assert archive_rows(run_dir) == reference_rows
    # Four initial candidates plus offspring; fewer than 8 only when pymoo removed duplicates.
    assert 5 <= len(reference_rows) <= 8
    # The candidates differ, so equal archives are not trivially equal.
    assert len({row["mean_tokens"] for row in reference_rows}) > 1
    assert (run_dir / FRONT_FILE).read_text() == (reference_run / FRONT_FILE).read_text()
    assert (run_dir / "parents.json").read_text() == (reference_run / "parents.json").read_text()


@pytest.fixture(scope="class")
def fault_backend(ray_cluster, search_config):
    """Two fault-injecting actors, shared by the fault tests (starting actors takes seconds).

    Class scope: the actors hold both CPUs of the cluster, so they must be gone before other tests.
    """
    ray_cluster.cloudpickle.register_pickle_by_value(faulty_workers)
    backend = RayBackend(load_config(search_config), RaySettings(num_actors=2), "cpu",
                         worker_class=faulty_workers.FaultInjectingWorker)  # fmt: skip
    yield backend
    backend.close()


class TestFaults:
    """An actor killed mid-run, and a candidate that fails on every attempt."""

    def test_killed_actor_loses_no_candidate(self, fault_backend, search_config, reference_run, fault_folder, tmp_path,
                                             caplog):  # fmt: skip
        (fault_folder / faulty_workers.CRASH_ARMED).touch()
        deaths_before = sum(fault_backend.deaths)
        with caplog.at_level(logging.WARNING, logger="mergekit_ext.evo.ray_backend"):
            run_search_with(fault_backend, search_config, tmp_path / "run")

        crashed_key = (fault_folder / faulty_workers.CRASHED).read_text()
        assert archive_rows(tmp_path / "run") == archive_rows(reference_run)
        assert crashed_key in Archive(tmp_path / "run" / ARCHIVE_FILE)
        assert sum(fault_backend.deaths) == deaths_before + 1
        deaths = [record.getMessage() for record in caplog.records if "died while evaluating" in record.getMessage()]
        assert len(deaths) == 1
        assert crashed_key in deaths[0]
        retries = [record.getMessage() for record in caplog.records if "retrying" in record.getMessage()]
        assert len(retries) == 1
        assert crashed_key in retries[0]

    def test_candidate_failing_twice_is_archived_as_failed(self, fault_backend, search_config, reference_run,
                                                           fault_folder, tmp_path, caplog):  # fmt: skip
        failing_key = archive_rows(reference_run)[1]["key"]
        (fault_folder / faulty_workers.FAIL_KEY).write_text(failing_key)
        with caplog.at_level(logging.WARNING, logger="mergekit_ext.evo.ray_backend"):
            front = run_search_with(fault_backend, search_config, tmp_path / "run")

        archive = Archive(tmp_path / "run" / ARCHIVE_FILE)
        failed = archive.get(failing_key)
        assert failed is not None
        assert failed.error == f"ValueError: injected failure for {failing_key}"
        assert failed.result.accuracy == 0.0
        assert failed.result.mean_tokens == MAX_NEW_TOKENS
        assert [entry.key for entry in archive.entries.values() if entry.error is not None] == [failing_key]
        # The search went on into the second generation, and the failed candidate is never on the front.
        assert max(entry.generation for entry in archive.entries.values()) == 1
        assert front
        assert failing_key not in {entry.key for entry in front}
        messages = [record.getMessage() for record in caplog.records if failing_key in record.getMessage()]
        assert len(messages) == 2
        assert "attempt 1 of 2" in messages[0]
        assert "failed 2 times" in messages[1]
        # The error is in the archive file, on the failed candidate's line.
        assert json.loads((tmp_path / "run" / ARCHIVE_FILE).read_text().splitlines()[1])["error"] == failed.error


def test_resume_after_driver_killed(ray_cluster, search_config, reference_run, tmp_path):
    """A driver process joins the cluster, is killed mid-search, and a resumed run completes the same archive."""
    run_dir = tmp_path / "run"
    address = ray_cluster.get_runtime_context().gcs_address
    command = [sys.executable, "-m", "mergekit_ext.cli.main", "--device", "cpu", "evo", "search", str(search_config),
               "--output", str(run_dir), "--backend", "ray", "--ray-address", address, "--ray-actors", "1"]
    log_path = tmp_path / "driver.log"
    with log_path.open("wb") as log:
        driver = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    archive_path = run_dir / ARCHIVE_FILE
    # The loop ends as soon as two candidates are archived; the deadline only bounds a
    # driver that never gets there. It is generous because starting a driver that joins
    # the cluster took over 60 s on a 2-core machine running other jobs.
    deadline = time.monotonic() + 300
    try:
        # Kill the driver once the first candidates are archived, before the search ends.
        while time.monotonic() < deadline and driver.poll() is None:
            if archive_path.is_file() and len(archive_path.read_text().splitlines()) >= 2:
                break
            time.sleep(0.05)
    finally:
        try:
            os.killpg(driver.pid, signal.SIGKILL)
        except ProcessLookupError:  # the driver ended by itself; the assert below reports how
            pass
        driver.wait()
    assert driver.returncode == -signal.SIGKILL, log_path.read_text(errors="replace")[-2000:]
    assert archive_path.is_file(), "no candidate archived within 300 s: " + log_path.read_text(errors="replace")[-2000:]
    archived_before_kill = len(archive_path.read_text().splitlines())
    reference_rows = archive_rows(reference_run)
    assert 2 <= archived_before_kill < len(reference_rows)

    result = CliRunner().invoke(
        cli, ["--device", "cpu", "evo", "search", "--resume", str(run_dir), "--backend", "ray", "--ray-actors", "2"]
    )
    assert result.exit_code == 0, result.output
    assert archive_rows(run_dir) == reference_rows
    assert (run_dir / FRONT_FILE).read_text() == (reference_run / FRONT_FILE).read_text()
