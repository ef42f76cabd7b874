"""Fixtures of the Ray backend tests: one local 2-CPU Ray cluster on loopback, and the evo test models."""

from __future__ import annotations

import os

import pytest

from mergekit_ext.evo.ray_cluster import LOCAL_ONLY_ENVIRONMENT
from tests.evo_ray.faulty_workers import FAULT_FOLDER_VARIABLE
from tests.evo.conftest import problem_file, single_thread, tiny_models  # noqa: F401  (fixtures)

# Ray reads these when it is imported: listen on loopback only, send no usage statistics.
for _name, _value in LOCAL_ONLY_ENVIRONMENT.items():
    os.environ.setdefault(_name, _value)


@pytest.fixture(scope="session")
def fault_folder(tmp_path_factory):
    """Folder through which tests configure the fault-injecting actors."""
    return tmp_path_factory.mktemp("faults")


@pytest.fixture(scope="session")
def ray_cluster(fault_folder):
    """Start a local Ray cluster with 2 CPUs for the session and shut it down afterwards."""
    ray = pytest.importorskip(
        "ray", reason="the Ray backend tests need ray (pip install 'mergekit-ext[dist]')", exc_type=ImportError
    )
    # Actor processes inherit the environment of the cluster at start.
    os.environ[FAULT_FOLDER_VARIABLE] = str(fault_folder)
    ray.init(
        num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
        object_store_memory=100 * 1024 * 1024, log_to_driver=False,
    )  # fmt: skip
    yield ray
    ray.shutdown()
