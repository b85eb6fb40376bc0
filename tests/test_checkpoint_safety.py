"""Checkpoints are read with weights_only=True: a pickle in a run folder never runs, and
`plsynth export --run` works on a real training run (its RNG state is stored as tensors)."""

from __future__ import annotations

import os
import pickle
import random
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from plsynth.bundles.segmenter import load_bundle
from plsynth.errors import ExitCode, InputError
from plsynth.training.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[1]
TINY = ["--config", str(REPO / "configs" / "phantom-smoke.yaml"), "--set", "train.epochs=1", "--set", "data.phantom_n=3",
        "--set", "data.phantom_shape=[8,64,64]", "--set", "data.image_size=32", "--set", "synth.image_size=32"]


def run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_AUTH_MODE": "disabled"}
    return subprocess.run([str(BIN / "plsynth"), *args], capture_output=True, text=True, env=env, timeout=300,
                          stdin=subprocess.DEVNULL)


class _Payload:
    """Unpickling this creates a marker file: proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_rng_state_round_trips_through_weights_only(tmp_path: Path):
    np.random.seed(3)
    random.seed(4)
    torch.manual_seed(5)
    save_checkpoint(tmp_path / "last.pt", {"rng": rng_state()})
    expected = (np.random.rand(3), random.random(), torch.rand(2))
    set_rng_state(torch.load(tmp_path / "last.pt", weights_only=True)["rng"])
    again = (np.random.rand(3), random.random(), torch.rand(2))
    np.testing.assert_array_equal(expected[0], again[0])
    assert expected[1] == again[1] and torch.equal(expected[2], again[2])
    assert stat.S_IMODE((tmp_path / "last.pt").stat().st_mode) != 0o600, "checkpoints get the usual file mode"


def test_a_pickle_in_the_run_folder_is_refused_and_never_runs(tmp_path: Path):
    out, marker = tmp_path / "run", tmp_path / "pwned"
    out.mkdir()
    with open(out / "last.pt", "wb") as handle:
        pickle.dump({"step": _Payload(marker)}, handle)
    with pytest.raises(InputError, match="weights_only"):
        load_checkpoint(out / "last.pt")
    assert not marker.exists()
    result = run("train", "baseline", *TINY, "--out", str(out))
    assert result.returncode == ExitCode.NO_INPUT, result.stderr[-2000:]
    assert "weights_only" in result.stderr and "Traceback" not in result.stderr
    assert not marker.exists()


@pytest.mark.slow
def test_export_works_on_a_real_training_run(tmp_path: Path):
    out = tmp_path / "run"
    trained = run("train", "baseline", *TINY, "--out", str(out))
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert "numpy" in torch.load(out / "last.pt", weights_only=True)["rng"]
    assert stat.S_IMODE((out / "bundle").stat().st_mode) & 0o055, "the bundle folder is readable by others (not 0700)"
    exported = run("export", "--run", str(out), "--out", str(tmp_path / "exported"))
    assert exported.returncode == 0, exported.stderr[-3000:]
    assert load_bundle(tmp_path / "exported").meta["exported_from"] == "best.pt"
