"""Session-wide test fixtures: one local Ray per test run, the shared Med3DVLM fixtures, tiny archives."""

from __future__ import annotations

import os
from pathlib import Path

# Before anything imports ray or transformers: loopback tests need no token auth, and nothing may
# reach a model hub.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("VOXSEARCH_SHARED", REPO.parent / "shared"))


@pytest.fixture(scope="session")
def med3dvlm_fixtures() -> Path:
    path = SHARED / "fixtures" / "med3dvlm"
    if not path.is_dir():
        pytest.fail(f"Med3DVLM reference fixtures not found at {path} (expected ../shared beside the repo)")
    return path


@pytest.fixture(scope="session")
def ray_session():
    """The one Ray of the test run; tests that need Ray take this fixture."""
    from voxsearch.runtime import RayConfig, init_ray

    ray = init_ray(RayConfig(num_cpus=2, object_store_memory=500_000_000))
    yield ray
    try:
        from ray import serve

        serve.shutdown()
    except Exception:
        pass
    ray.shutdown()
