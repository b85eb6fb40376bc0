"""bench/gpu_check.py on this CPU-only machine: the no-CUDA message (exit 0, nothing written),
and every section of the check run end to end on the CPU at phantom-smoke sizes (--cpu-smoke),
which is the code that runs on a GPU machine with device "cuda" and AMP added.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "gpu_check.py"


def _run(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(SCRIPT), *args], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the no-CUDA path")
def test_without_cuda_it_says_so_and_exits_0(tmp_path):
    out = tmp_path / "gpu_check.json"
    proc = _run("--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "no CUDA GPU" in proc.stdout and "nothing to check" in proc.stdout
    assert not out.exists()


@pytest.mark.slow
def test_every_section_runs_on_the_cpu_smoke_path(tmp_path):
    out = tmp_path / "gpu_check.json"
    proc = _run("--cpu-smoke", "--out", str(out), "--work", str(tmp_path / "work"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["device"] == "cpu" and result["cpu_smoke"] is True
    for name in ("data", "training", "throughput", "onnx_segmenter", "onnx_decoder"):
        assert "error" not in result[name] and "skipped" not in result[name], (name, result[name])
    for method in ("baseline", "cps", "sa-cps", "st", "sa-st"):
        row = result["training"][f"{method}/amp-off"]
        assert row["steps"] == 3 and row["loss_finite"], (method, row)
    assert result["throughput"]["segmenter/amp-off"]["slices_per_s"] > 0
    assert result["onnx_segmenter"]["ort-cpu"]["max_abs_logit_diff"] < 1e-3
    assert result["onnx_segmenter"]["ort-cpu"]["mask_dice_vs_torch"] > 0.99
    assert result["onnx_decoder"]["ort-cpu"]["max_abs_diff"] < 1e-3


def test_a_used_up_time_budget_skips_sections_but_still_writes_the_file(tmp_path):
    out = tmp_path / "gpu_check.json"
    proc = _run("--cpu-smoke", "--budget-s", "0", "--out", str(out), "--work", str(tmp_path / "work"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert "skipped" in result["data"] and "environment" in result
