"""The one exit-code table (plsynth.errors.ExitCode) on every installed console script, run as a user would.

Usage errors give exit 2, a usage line and no traceback (typer 0.29 raises its own bundled click
exceptions, which the entry points once let through as a traceback and exit 70 or 1).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from plsynth.errors import ExitCode

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[1]


def run(script: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_AUTH_MODE": "disabled"}
    return subprocess.run([str(BIN / script), *args], capture_output=True, text=True, env=env, timeout=timeout,
                          stdin=subprocess.DEVNULL)


USAGE_ERRORS = [
    ("plsynth-infer", ["--bogus", "x"]),
    ("plsynth-infer", ["x", "--engine", "tensorrt", "--model", "b"]),
    ("plsynth-infer", ["x", "--batch-size", "0", "--model", "b"]),
    ("plsynth-infer", ["x", "--format", "dicom", "--model", "b"]),
    ("plsynth-infer", []),  # missing INPUT
    ("plsynth", ["bogus"]),
    ("plsynth", ["train", "cps", "--bogus"]),
    ("plsynth", ["export", "--run", "/nonexistent-run"]),
    ("train_sa_cps", ["--bogus"]),
    ("train_sa_st", ["--config", "/nonexistent.yaml"]),
]


@pytest.mark.parametrize("script,args", USAGE_ERRORS, ids=[f"{s} {' '.join(a)}" for s, a in USAGE_ERRORS])
def test_usage_errors_exit_2_with_a_usage_line_and_no_traceback(script, args):
    result = run(script, *args)
    assert result.returncode == ExitCode.USAGE, result.stderr
    assert "Usage:" in result.stderr and "Error:" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def test_config_error_is_exit_2_for_plsynth_and_the_ray_entry(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("nope: 1\n")
    for script, args in (("plsynth", ["train", "cps", "--config", str(bad), "--out", str(tmp_path / "r")]),
                         ("train_sa_cps", ["--config", str(bad), "--out", str(tmp_path / "r")])):
        result = run(script, *args)
        assert result.returncode == ExitCode.USAGE and "config error" in result.stderr, result.stderr
        assert "Traceback" not in result.stderr
    assert not (tmp_path / "r").exists(), "a refused config leaves no run folder behind"


def test_a_too_small_phantom_is_a_config_error_not_an_internal_one(tmp_path):
    """phantom_shape is checked with the config (exit 2 naming the key), not deep in the phantom drawer (exit 70)."""
    bad = tmp_path / "tiny.yaml"
    bad.write_text("name: tiny\ndata:\n  layout: phantom\n  phantom_shape: [4, 32, 32]\n")
    result = run("plsynth", "train", "baseline", "--config", str(bad), "--out", str(tmp_path / "r"))
    assert result.returncode == ExitCode.USAGE and "phantom_shape" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_unreadable_bundle_is_exit_4_without_traceback(tmp_path):
    volume = tmp_path / "v.nii.gz"
    volume.write_bytes(b"x")
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "meta.json").write_text("{not json")
    result = run("plsynth-infer", str(volume), "--model", str(bundle), "-o", str(tmp_path / "out"))
    assert result.returncode == ExitCode.BUNDLE and "meta.json" in result.stderr
    assert "Traceback" not in result.stderr


def test_internal_errors_are_one_line_and_the_traceback_comes_with_verbose(tmp_path):
    """An unexpected exception (here: a training --out that is a file) is exit 70, traceback only with --verbose."""
    out = tmp_path / "file"
    out.write_text("not a folder")
    args = ["train", "cps", "--config", str(REPO / "configs" / "phantom-smoke.yaml"), "--out", str(out)]
    quiet = run("plsynth", *args)
    assert quiet.returncode == ExitCode.INTERNAL and "internal error" in quiet.stderr and "--verbose" in quiet.stderr
    assert "Traceback" not in quiet.stderr
    loud = run("plsynth", "--verbose", *args)
    assert loud.returncode == ExitCode.INTERNAL and "Traceback" in loud.stderr
