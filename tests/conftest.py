"""Shared fixtures. Tests make their own data (phantoms) and never download anything."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def semiseg_root() -> Path:
    """COVID-SemiSeg slices from ../shared/data; skips cleanly where it is absent (e.g. outside this workplace)."""
    root = SHARED_DATA / "covid-semiseg"
    if not (root / "labeled" / "images").is_dir():
        pytest.skip(f"COVID-SemiSeg not found at {root}")
    return root


@pytest.fixture(scope="session")
def splits_root() -> Path:
    root = SHARED_DATA / "splits"
    if not root.is_dir():
        pytest.skip(f"paper split files not found at {root}")
    return root


@pytest.fixture(autouse=True, scope="session")
def _quiet_threads() -> None:
    # Two cores: keep torch from oversubscribing when pytest runs alongside Ray workers.
    os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(scope="module")
def ray_local():
    """A real local Ray (2 CPUs, no dashboard) for one test module; shut down after it."""
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    if started:
        ray.shutdown()
