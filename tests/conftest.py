"""Shared fixtures. Tests make their own data (phantoms) and never download anything."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def data_root() -> Path:
    """Where tests find real datasets: $PLSYNTH_DATA, the product's variable (data/layouts.py), else
    ../shared/data beside the checkout, where this workplace keeps them. The fallback lives here, not
    in the Makefile, so that no product file names a path outside the repository and a bare `pytest`
    finds the data as `make test` does."""
    from plsynth.data.layouts import DATA_ENV

    return Path(os.environ.get(DATA_ENV) or REPO.parent / "shared" / "data")


@pytest.fixture(scope="session")
def semiseg_root() -> Path:
    """COVID-SemiSeg slices (data_root()/covid-semiseg); skips cleanly where they are absent."""
    root = data_root() / "covid-semiseg"
    if not (root / "labeled" / "images").is_dir():
        pytest.skip(f"COVID-SemiSeg not found at {root} (set PLSYNTH_DATA)")
    return root


@pytest.fixture(scope="session")
def splits_root() -> Path:
    """The paper's split files as this workplace received them, to check the copies shipped in the package."""
    root = data_root() / "splits"
    if not root.is_dir():
        pytest.skip(f"original paper split files not found at {root}")
    return root


@pytest.fixture(autouse=True)
def _keep_the_locale():
    """GDCM's DICOM writer (SimpleITK), which test helpers use to make series, sets the C locale for the
    whole process; later tests would then open text files as ASCII (torch.compile's templates do). The
    product never writes DICOM with GDCM (DICOM SEG goes through highdicom)."""
    import locale

    saved = locale.setlocale(locale.LC_ALL)
    yield
    locale.setlocale(locale.LC_ALL, saved)


@pytest.fixture(autouse=True)
def _seeded_torch():
    """Each test starts from the same torch default generator, whatever ran before it: this torch seeds
    that generator differently in each process, so a test that builds random weights without its own
    seed drew new ones each run and could land either side of a float tolerance (test_sean did, 2 runs
    in 14). Only where torch is already imported: tests that check torch stays out must not pull it in."""
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.manual_seed(0)
    yield


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
