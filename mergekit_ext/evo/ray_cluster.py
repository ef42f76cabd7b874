"""Connection to a Ray cluster and the sizing of the evaluation actors.

Without an address a single-node cluster starts on this machine and listens on
loopback only. Ray 2.60 turns `_node_ip_address="127.0.0.1"` into the machine's
outward address, and its gRPC servers then bind to every interface, unless the
environment variable `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER` is 0 when `ray` is first
imported (Ray's single-machine mode, the default on macOS and Windows).
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass
from types import ModuleType

from mergekit_ext.errors import RecipeError

logger = logging.getLogger(__name__)

# Environment that `ray` reads at import time (see the module docstring).
LOCAL_ONLY_ENVIRONMENT = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}


@dataclass(frozen=True)
class RaySettings:
    """Cluster address, actor sizing and fault limits of the Ray backend."""

    # None starts a local single-node cluster on loopback, and "auto" or "HOST:PORT" joins a running one.
    address: str | None = None
    # Number of evaluation actors. None gives one per GPU, or one per `cpus_per_actor` CPUs without GPUs.
    num_actors: int | None = None
    # CPUs reserved by each actor, also its number of torch threads.
    cpus_per_actor: int = 1
    # Evaluations of one candidate before it is archived as failed.
    max_attempts: int = 2
    # Ray restarts of one actor process after it dies (each restart rebuilds the resident model).
    max_restarts: int = 3
    # CPUs of a local cluster this backend starts (None: every core of the machine).
    local_cpus: int | None = None

    def __post_init__(self) -> None:
        if self.num_actors is not None and self.num_actors < 1:
            raise RecipeError(f"--ray-actors must be at least 1, got {self.num_actors}.")
        if self.cpus_per_actor < 1:
            raise RecipeError(f"cpus_per_actor must be at least 1, got {self.cpus_per_actor}.")
        if self.max_attempts < 1:
            raise RecipeError(f"max_attempts must be at least 1, got {self.max_attempts}.")
        if self.max_restarts < 0:
            raise RecipeError(f"max_restarts must be 0 or more, got {self.max_restarts}.")


def import_ray(local_cluster: bool) -> ModuleType:
    """Import `ray`; before the first import for a local cluster, set the loopback-only environment."""
    if local_cluster and "ray" not in sys.modules:
        for name, value in LOCAL_ONLY_ENVIRONMENT.items():
            os.environ.setdefault(name, value)
    try:
        import ray
    except ImportError:
        raise RecipeError(
            "The ray backend needs Ray; install it with `pip install 'mergekit-ext[dist]'` (ray>=2.9)."
        ) from None
    return ray


def connect(settings: RaySettings) -> bool:
    """Connect to the cluster of `settings`, or start a local one; return True when this call started Ray.

    A process where Ray is already initialized keeps its connection, and the
    address in `settings` is then ignored.
    """
    ray = import_ray(local_cluster=settings.address is None)
    if ray.is_initialized():
        return False
    if settings.address is None:
        from ray._private import ray_constants

        if ray_constants.ENABLE_RAY_CLUSTER:
            logger.warning(
                "ray was imported before the loopback-only environment was set, so the local Ray cluster "
                "listens on every interface; set RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 before starting Python."
            )
        ray.init(num_cpus=settings.local_cpus, include_dashboard=False, _node_ip_address="127.0.0.1")
        logger.info("Started a local Ray cluster at %s", ray.get_runtime_context().gcs_address)
        return True
    try:
        ray.init(address=settings.address)
    except ConnectionError as error:
        raise RecipeError(
            f"Cannot connect to the Ray cluster at {settings.address!r} ({error}); check --ray-address, "
            "or leave it out to start a local cluster."
        ) from error
    logger.info("Connected to the Ray cluster at %s", ray.get_runtime_context().gcs_address)
    return True


@dataclass(frozen=True)
class ActorPlan:
    """Number of actors and what each one reserves."""

    num_actors: int
    num_cpus: int
    num_gpus: int
    device: str


def plan_actors(settings: RaySettings, device: str, cluster_resources: dict[str, float]) -> ActorPlan:
    """Choose one actor per GPU (device auto or cuda on a cluster with GPUs), else one per CPU slot.

    `device` is the `--device` option: cpu forces CPU actors, cuda requires GPUs,
    auto takes GPUs when the cluster has any.
    """
    gpus = int(cluster_resources.get("GPU", 0))
    cpus = int(cluster_resources.get("CPU", 0))
    device = device.strip().lower()
    if device.startswith("cuda") and gpus == 0:
        raise RecipeError(f"--device {device} requested but the Ray cluster has no GPU; use --device cpu or auto.")
    use_gpu = gpus > 0 and device != "cpu"
    if settings.num_actors is not None:
        count = settings.num_actors
    elif use_gpu:
        count = gpus
    else:
        count = max(1, cpus // settings.cpus_per_actor)
    return ActorPlan(
        num_actors=count,
        num_cpus=settings.cpus_per_actor,
        num_gpus=1 if use_gpu else 0,
        # Ray sets CUDA_VISIBLE_DEVICES per actor, so its one GPU is always cuda:0 inside it.
        device="cuda" if use_gpu else "cpu",
    )
