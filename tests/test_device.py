"""Training device and mixed precision: `--device auto|cuda|cpu` and `train.amp`.

There is no GPU on these machines: the tests that need one replace ONLY torch's GPU queries
(`torch.cuda.is_available`, `torch.cuda.is_bf16_supported`) with monkeypatch; everything else
is real, and the CLI test runs the installed `plsynth` console script.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from plsynth.config import Config, ConfigError, load_config
from plsynth.errors import ExitCode
from plsynth.training.loop import amp_dtype, select_device
from plsynth.training.ray_train import use_gpus

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


@pytest.fixture
def fake_gpu(monkeypatch):
    """Mock of the GPU only: torch reports a CUDA device (bf16 support set per test)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    support = {"bf16": True}
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: support["bf16"])
    return support


@pytest.fixture
def no_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_auto_is_cpu_without_a_gpu_and_cuda_is_then_a_usage_error(no_gpu):
    assert select_device("auto") == "cpu"
    assert select_device("cpu") == "cpu"
    with pytest.raises(ConfigError, match="no CUDA GPU"):
        select_device("cuda")


def test_auto_picks_cuda_when_torch_sees_a_gpu(fake_gpu):
    assert select_device("auto") == "cuda"
    assert select_device("cuda") == "cuda"
    assert select_device("cpu") == "cpu"  # an explicit cpu is honoured


def test_amp_is_bf16_on_a_gpu_that_supports_it_else_fp16(fake_gpu):
    assert amp_dtype("auto", "cuda") is torch.bfloat16
    assert amp_dtype("auto", "cuda:1") is torch.bfloat16
    fake_gpu["bf16"] = False  # e.g. a V100 or T4
    assert amp_dtype("auto", "cuda") is torch.float16
    assert amp_dtype("bf16", "cuda") is torch.bfloat16
    assert amp_dtype("fp16", "cuda") is torch.float16
    assert amp_dtype("off", "cuda") is None


def test_the_cpu_always_trains_in_float32():
    for amp in ("auto", "bf16", "fp16", "off"):
        assert amp_dtype(amp, "cpu") is None


def test_ray_workers_get_a_gpu_for_cuda_never_for_cpu():
    cfg = Config()
    with_device = lambda d, **ray: cfg.replace(train=dataclasses.replace(cfg.train, device=d),  # noqa: E731
                                               ray=dataclasses.replace(cfg.ray, **ray))
    assert use_gpus(with_device("cuda"))
    assert not use_gpus(with_device("cpu", use_gpu=True))
    assert use_gpus(with_device("auto", use_gpu=True))


def test_config_keys_are_validated(tmp_path):
    cfg = load_config(REPO / "configs" / "phantom-smoke.yaml", ["train.device=cpu", "train.amp=bf16"])
    assert (cfg.train.device, cfg.train.amp) == ("cpu", "bf16")
    assert Config().train.device == "auto" and Config().train.amp == "auto"
    with pytest.raises(ConfigError, match="train.device"):
        load_config(REPO / "configs" / "phantom-smoke.yaml", ["train.device=tpu"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path")
def test_plsynth_train_device_cuda_without_a_gpu_exits_2_before_any_work(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    out = tmp_path / "run"
    proc = subprocess.run([str(BIN / "plsynth"), "train", "baseline", "--config", str(REPO / "configs" / "phantom-smoke.yaml"),
                           "--out", str(out), "--device", "cuda"], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == ExitCode.USAGE, proc.stderr
    assert "no CUDA GPU" in proc.stderr and "Traceback" not in proc.stderr
    assert not (out / "data").exists()
