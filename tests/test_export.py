"""`plsynth export --run DIR`: a run's checkpoint -> bundle, parity measured and gated."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from _fixtures import tiny_config, tiny_unet
from plsynth.bundles.onnx_export import check_parity, export_onnx, parity_slices
from plsynth.bundles.segmenter import load_bundle
from plsynth.cli import app
from plsynth.errors import BundleError, ExitCode
from plsynth.models.unet import UNet

CFG = tiny_config()


def net(seed: int) -> UNet:
    return tiny_unet(seed, varied_norm=True)  # masks neither empty nor full


def phantom_slices(count: int) -> np.ndarray:
    return parity_slices(32, CFG.data.window_hu, CFG.data.lung_handling)[:count]


def write_run(run: Path, names=("model", "peer")) -> Path:
    run.mkdir(parents=True)
    state = {
        "networks": {n: net(i).state_dict() for i, n in enumerate(names)},
        "config": CFG.to_dict(),
        "val": {"dice": 0.61, "nsd": 0.7},
        "step": 40,
        "epoch": 2,
    }
    torch.save(state, run / "best.pt")
    return run


def test_export_writes_a_bundle_with_parity_from_the_best_checkpoint(tmp_path: Path):
    run = write_run(tmp_path / "run")
    result = CliRunner().invoke(app, ["export", "--run", str(run)])
    assert result.exit_code == 0, result.output
    bundle = load_bundle(run / "bundle")
    meta = bundle.meta
    assert bundle.network_names == ["model", "peer"] and meta["exported_from"] == "best.pt"
    assert meta["metrics"]["val_dice"] == 0.61
    for name in ("model", "peer"):
        parity = meta["parity"][name]
        assert parity["mask_dice"] >= 0.99 and parity["max_abs_diff"] < 1e-4 and parity["inputs"] == "phantom chest slices"
    x = torch.from_numpy(phantom_slices(3))
    with torch.inference_mode():
        logits = bundle.torch_networks()["peer"](x)
        np.testing.assert_allclose(logits.numpy(), net(1)(x).numpy(), atol=1e-6)
    assert 0.0 < float((logits >= 0).float().mean()) < 1.0  # the parity above compared real masks


def shifted(seed: int, bias: float) -> UNet:
    model = net(seed)
    with torch.no_grad():
        model.head.bias.fill_(bias)  # +10: every pixel infected; -10: none
    return model


def test_parity_gate_refuses_an_onnx_that_disagrees_with_its_network(tmp_path: Path):
    onnx = export_onnx(shifted(5, 10.0), tmp_path / "m.onnx", {"x": torch.zeros(1, 1, 32, 32)}, ["logits"])
    slices = phantom_slices(4)
    assert check_parity(shifted(5, 10.0), onnx, slices, 0.5)["mask_dice"] == 1.0
    with pytest.raises(BundleError, match="mask Dice 0.0000 < 0.99"):
        check_parity(shifted(5, -10.0), onnx, slices, 0.5)


def _plsynth(*args: str) -> subprocess.CompletedProcess:
    """The installed `plsynth` console script, as a user runs it."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([str(Path(sys.executable).parent / "plsynth"), *args], capture_output=True, text=True,
                          env=env, timeout=300, stdin=subprocess.DEVNULL)


def test_export_without_checkpoint_or_with_trt_on_cpu_fails_clearly(tmp_path: Path):
    (tmp_path / "empty").mkdir()
    result = _plsynth("export", "--run", str(tmp_path / "empty"))
    assert result.returncode == ExitCode.NO_INPUT and "best.pt" in result.stderr and "Traceback" not in result.stderr
    from plsynth.bundles.tensorrt_engine import tensorrt_status

    if tensorrt_status()[0] and torch.cuda.is_available():
        pytest.skip("TensorRT and a GPU are here: --trt would succeed")
    run = write_run(tmp_path / "run", names=("model",))
    result = _plsynth("export", "--run", str(run), "--trt", "--fp16")
    assert result.returncode == ExitCode.ENGINE and "TensorRT" in result.stderr and "Traceback" not in result.stderr
    assert json.loads((run / "bundle" / "meta.json").read_text())["networks"].keys() == {"model"}
