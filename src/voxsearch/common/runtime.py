"""Where Ray runs: an in-process local Ray by default, or a cluster given by address or RAY_ADDRESS."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass
class RayConfig:
    # None: RAY_ADDRESS if set, else a local Ray started in this process.
    address: str | None = None
    num_cpus: int | None = None
    # A small object store keeps a laptop-sized local Ray light (~0.7 GB instead of ~1.6 GB).
    object_store_memory: int | None = 500_000_000
    include_dashboard: bool = False


def init_ray(config: RayConfig | None = None):
    """Connect to (or start) Ray once per process and return the `ray` module."""
    import ray

    if ray.is_initialized():
        return ray
    config = config or RayConfig()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address = config.address or os.environ.get("RAY_ADDRESS")
    if address:
        log.info("connecting to Ray cluster at %s", address)
        ray.init(address=address, log_to_driver=False)
    else:
        ray.init(
            # "local": a new in-process cluster even when a `ray start` cluster runs on this machine.
            address="local",
            num_cpus=config.num_cpus,
            include_dashboard=config.include_dashboard,
            object_store_memory=config.object_store_memory,
            log_to_driver=False,
            configure_logging=False,
        )
    return ray
