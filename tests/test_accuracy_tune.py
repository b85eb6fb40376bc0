"""bench/accuracy.py --tune: the accuracy sweep as Ray Tune trials (a real embedded local Ray)
gives the sequential table's numbers for one method and seed on the smoke preset, trains an ST
row after its teacher (second Tuner), and a second call resumes without retraining.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("ray.tune")

REPO = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.ray, pytest.mark.slow]


def _accuracy(out: Path, *args: str) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"), RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0",
               OMP_NUM_THREADS="1")
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "accuracy.py"), "--config",
                           str(REPO / "configs" / "phantom-smoke.yaml"), "--seeds", "0", "--out", str(out),
                           "--results", str(out / "accuracy.md"), "--set", "train.threads=1", *args],
                          env=env, capture_output=True, text=True, timeout=900, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((out / "accuracy.json").read_text())["results"]


def test_the_tune_form_reproduces_the_sequential_numbers_and_resumes(tmp_path):
    sequential = _accuracy(tmp_path / "seq", "--methods", "baseline")
    tuned = _accuracy(tmp_path / "tune", "--methods", "baseline", "st", "--tune", "--trial-cpus", "1")
    a, b = sequential["baseline"][0], tuned["baseline"][0]
    assert (a["seed"], a["step"], a["cases"]) == (b["seed"], b["step"], b["cases"])
    assert b["dice"] == pytest.approx(a["dice"], abs=1e-6) and b["nsd"] == pytest.approx(a["nsd"], abs=1e-6)
    # the ST row trained after its teacher, from that teacher
    st = tuned["st"][0]
    meta = json.loads((tmp_path / "tune" / st["run"] / "bundle" / "meta.json").read_text())
    assert str(tmp_path / "tune" / "baseline-s0" / "bundle") in json.dumps(meta)
    assert (tmp_path / "tune" / "tune" / "rows").is_dir() and (tmp_path / "tune" / "tune" / "self-training-rows").is_dir()
    # a second call restores the Tune experiments: nothing is retrained, the numbers stay
    checkpoints = {p: p.stat().st_mtime_ns for p in (tmp_path / "tune").glob("*-s0/last.pt")}
    assert len(checkpoints) == 2
    again = _accuracy(tmp_path / "tune", "--methods", "baseline", "st", "--tune", "--trial-cpus", "1")
    assert again["baseline"][0]["dice"] == b["dice"] and again["st"][0]["dice"] == st["dice"]
    assert {p: p.stat().st_mtime_ns for p in checkpoints} == checkpoints
