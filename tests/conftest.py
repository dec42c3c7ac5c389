"""One Ray cluster for the whole test session (starting one costs ~8 s here)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"


@pytest.fixture(scope="session")
def ray_cluster():
    import ray

    from internray import runtime

    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    info = runtime.connect(num_cpus=2)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield info
    runtime.shutdown()
