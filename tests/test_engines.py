"""Engine choice, the ONNX Runtime provider check, OpenVINO on the CPU, and the TensorRT engine cache.

TensorRT and GPUs do not exist on these machines: the provider lists below are FAKED (a GPU
machine's list, as onnxruntime-gpu reports it even without a GPU), and the TensorRT builder is a fake function; the real TensorRT tests skip.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from _fixtures import tiny_unet
from plsynth.deploy.engines import (
    EngineUnavailable,
    OpenVinoEngine,
    OrtEngine,
    TorchEngine,
    check_providers,
    open_engine,
    ort_providers,
    resolve_engine,
)
from plsynth.bundles.onnx_export import export_onnx
from plsynth.bundles.tensorrt_engine import DeviceInfo, Profile, cache_key, cached_engine, resolve_cache_dir, tensorrt_status
from plsynth.models.unet import UNet

GPU_LIST = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
CPU_LIST = ["CPUExecutionProvider"]
NO_TRT = (False, "TensorRT is not installed (faked)")


def test_providers_are_asked_for_best_first_and_cpu_only_on_request():
    assert ort_providers("auto", GPU_LIST) == GPU_LIST
    assert ort_providers("cuda", ["CUDAExecutionProvider", "CPUExecutionProvider"]) == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert ort_providers("cpu", GPU_LIST) == CPU_LIST
    assert ort_providers("auto", CPU_LIST) == CPU_LIST


def test_gpu_asked_but_cpu_loaded_is_refused_unless_fallback_allowed():
    with pytest.raises(EngineUnavailable, match="--allow-fallback"):
        check_providers(CPU_LIST, gpu_required=True, allow_fallback=False, source="model.onnx")
    assert check_providers(CPU_LIST, gpu_required=True, allow_fallback=True) == "CPUExecutionProvider"
    assert check_providers(["CUDAExecutionProvider", "CPUExecutionProvider"], True, False) == "CUDAExecutionProvider"
    assert check_providers(CPU_LIST, gpu_required=False, allow_fallback=False) == "CPUExecutionProvider"


def test_engine_choice_on_faked_machines():
    # GPU machine with TensorRT: auto picks trt; --device cpu never does
    assert resolve_engine("auto", "auto", False, GPU_LIST, (True, "10.9"), True, openvino=False) == "trt"
    assert resolve_engine("auto", "cpu", False, GPU_LIST, (True, "10.9"), True, openvino=False) == "ort"
    # CPU machine: auto -> ort, explicit trt refused or falls back
    assert resolve_engine("auto", "auto", False, CPU_LIST, NO_TRT, False, openvino=False) == "ort"
    with pytest.raises(EngineUnavailable, match="TensorRT"):
        resolve_engine("trt", "auto", False, CPU_LIST, NO_TRT, False)
    assert resolve_engine("trt", "auto", True, CPU_LIST, NO_TRT, False) == "ort"
    # TensorRT installed but no GPU visible
    with pytest.raises(EngineUnavailable, match="no CUDA device"):
        resolve_engine("trt", "auto", False, GPU_LIST, (True, "10.9"), False)
    # no onnxruntime at all: auto uses torch, explicit ort is refused
    assert resolve_engine("auto", "auto", False, [], NO_TRT, False, openvino=False) == "torch"
    with pytest.raises(EngineUnavailable, match="onnxruntime"):
        resolve_engine("ort", "auto", False, [], NO_TRT, False)
    with pytest.raises(ValueError, match="engine"):
        resolve_engine("onnx", "auto", False, CPU_LIST, NO_TRT, False)


def test_auto_takes_openvino_on_the_cpu_only():
    assert resolve_engine("auto", "auto", False, CPU_LIST, NO_TRT, False, openvino=True) == "openvino"
    assert resolve_engine("auto", "cpu", False, GPU_LIST, (True, "10.9"), True, openvino=True) == "openvino"
    assert resolve_engine("auto", "auto", False, [], NO_TRT, False, openvino=True) == "openvino"
    # a GPU stays first: TensorRT, or ONNX Runtime's CUDA provider
    assert resolve_engine("auto", "auto", False, GPU_LIST, (True, "10.9"), True, openvino=True) == "trt"
    assert resolve_engine("auto", "auto", False, GPU_LIST, NO_TRT, False, openvino=True) == "ort"
    # --device cuda is never answered by a CPU engine: ONNX Runtime, whose provider check refuses the CPU
    assert resolve_engine("auto", "cuda", False, CPU_LIST, NO_TRT, False, openvino=True) == "ort"
    with pytest.raises(EngineUnavailable, match="runs on the CPU"):
        resolve_engine("openvino", "cuda", False, CPU_LIST, NO_TRT, False, openvino=True)
    # asked for and not installed: refused, or ONNX Runtime with --allow-fallback
    with pytest.raises(EngineUnavailable, match="OpenVINO is not installed"):
        resolve_engine("openvino", "auto", False, CPU_LIST, NO_TRT, False, openvino=False)
    assert resolve_engine("openvino", "auto", True, CPU_LIST, NO_TRT, False, openvino=False) == "ort"


@pytest.fixture(scope="module")
def onnx_unet(tmp_path_factory) -> tuple[Path, UNet]:
    net = tiny_unet(0)
    path = tmp_path_factory.mktemp("e") / "model.onnx"
    export_onnx(net, path, {"x": torch.zeros(1, 1, 32, 32)}, ["logits"])
    return path, net


def test_ort_engine_reports_the_provider_that_actually_loaded(onnx_unet):
    path, _ = onnx_unet
    engine = open_engine(path, "ort", "cpu", threads=1)
    assert isinstance(engine, OrtEngine) and engine.provider == "CPUExecutionProvider"
    assert engine.providers == CPU_LIST


@pytest.mark.filterwarnings("ignore:Specified provider")
def test_ort_on_a_machine_without_gpu_refuses_a_cuda_request(onnx_unet):
    # The provider list is FAKED to a GPU machine's; the real session can only load the CPU provider
    # (this onnxruntime has no CUDA provider), which is exactly ORT's silent-fallback situation.
    path, _ = onnx_unet
    with pytest.raises(EngineUnavailable, match="GPU engine was requested"):
        open_engine(path, "ort", "cuda", available_providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    engine = open_engine(path, "ort", "cuda", allow_fallback=True, available_providers=CPU_LIST)
    assert engine.provider == "CPUExecutionProvider"


def test_torch_and_ort_engines_agree_for_any_batch(onnx_unet):
    path, net = onnx_unet
    ort_engine = open_engine(path, "ort", "cpu", threads=1)
    torch_engine = open_engine(net, "torch", "cpu")
    assert isinstance(torch_engine, TorchEngine) and torch_engine.provider == "torch:cpu"
    for batch in (1, 3):
        x = np.random.default_rng(batch).random((batch, 1, 32, 32), dtype=np.float32)
        a, b = torch_engine.run(x), ort_engine.run(x)
        assert a.shape == b.shape == (batch, 1, 32, 32)
        assert np.max(np.abs(a - b)) < 1e-4


def test_torch_engine_refuses_an_onnx_file_and_cuda_without_gpu(onnx_unet):
    path, net = onnx_unet
    with pytest.raises(ValueError, match="torch module"):
        open_engine(path, "torch", "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(EngineUnavailable, match="cuda"):
            open_engine(net, "torch", "cuda")


INFO = DeviceInfo("NVIDIA H100 80GB HBM3", "9.0", "10.9.0")


def test_cache_key_changes_with_every_field():
    base = cache_key(INFO, "a" * 64, "fp16", Profile(1, 8, 8))
    others = [
        cache_key(DeviceInfo("NVIDIA A100", "8.0", "10.9.0"), "a" * 64, "fp16", Profile(1, 8, 8)),
        cache_key(DeviceInfo(INFO.gpu_name, "8.9", "10.9.0"), "a" * 64, "fp16", Profile(1, 8, 8)),
        cache_key(DeviceInfo(INFO.gpu_name, "9.0", "10.10.0"), "a" * 64, "fp16", Profile(1, 8, 8)),
        cache_key(INFO, "b" * 64, "fp16", Profile(1, 8, 8)),
        cache_key(INFO, "a" * 64, "fp32", Profile(1, 8, 8)),
        cache_key(INFO, "a" * 64, "fp16", Profile(1, 16, 16)),
    ]
    assert len({base, *others}) == 7
    assert "sm90" in base and "fp16" in base and base == cache_key(INFO, "a" * 64, "fp16", Profile(1, 8, 8))


def test_engine_is_built_once_per_key_and_rebuilt_when_the_key_differs(tmp_path: Path):
    builds: list[tuple] = []

    def fake_builder(onnx: Path, engine: Path, fp16: bool, profile: Profile) -> None:  # stands in for TensorRT
        builds.append((fp16, profile))
        engine.write_bytes(b"engine:" + str(len(builds)).encode())

    onnx = tmp_path / "model.onnx"
    onnx.write_bytes(b"onnx")
    digest = "c" * 64
    first, built = cached_engine(onnx, digest, tmp_path, INFO, "fp32", Profile(1, 8, 8), fake_builder)
    assert built and first.read_bytes() == b"engine:1"
    again, built = cached_engine(onnx, digest, tmp_path, INFO, "fp32", Profile(1, 8, 8), fake_builder)
    assert not built and again == first and len(builds) == 1
    newer = DeviceInfo(INFO.gpu_name, INFO.compute_capability, "10.10.0")
    other, built = cached_engine(onnx, digest, tmp_path, newer, "fp32", Profile(1, 8, 8), fake_builder)
    assert built and other != first and not first.exists(), "stale engine of the same ONNX is removed"
    assert json.loads(other.with_suffix(".json").read_text())["tensorrt_version"] == "10.10.0"
    assert not list(tmp_path.glob(".*tmp*"))


def test_a_crashing_build_leaves_no_engine_under_its_final_name(tmp_path: Path):
    def crashing_builder(onnx: Path, engine: Path, fp16: bool, profile: Profile) -> None:
        engine.write_bytes(b"partial")
        raise RuntimeError("builder died")

    with pytest.raises(RuntimeError):
        cached_engine(tmp_path / "m.onnx", "d" * 64, tmp_path, INFO, "fp16", Profile(1, 4, 4), crashing_builder)
    assert list(tmp_path.iterdir()) == []


def test_cache_folder_is_inside_the_bundle_else_env_else_tmp(tmp_path: Path, monkeypatch):
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    assert resolve_cache_dir(bundle) == bundle / "cache"
    # a bundle whose cache cannot be created (here: a file in the way; in a container: a
    # read-only bundle mount) falls back to $PLSYNTH_CACHE_DIR, then to the temp folder
    blocked = tmp_path / "blocked"
    blocked.mkdir()
    (blocked / "cache").write_bytes(b"not a folder")
    monkeypatch.setenv("PLSYNTH_CACHE_DIR", str(tmp_path / "env-cache"))
    assert resolve_cache_dir(blocked) == tmp_path / "env-cache"
    monkeypatch.delenv("PLSYNTH_CACHE_DIR")
    assert resolve_cache_dir(blocked).name == "plsynth-cache"


def test_trt_engine_runs_when_tensorrt_and_a_gpu_exist(onnx_unet):
    ok, reason = tensorrt_status()
    if not ok:
        pytest.skip(reason)
    if not torch.cuda.is_available():
        pytest.skip("TensorRT is installed but no CUDA device is visible")
    path, net = onnx_unet
    engine = open_engine(path, "trt", "cuda", batch_size=4, cache_dir=path.parent / "cache")
    x = np.random.default_rng(0).random((3, 1, 32, 32), dtype=np.float32)
    assert np.max(np.abs(engine.run(x) - TorchEngine(net).run(x))) < 1e-2


def test_trt_engine_request_without_tensorrt_fails_with_a_clear_message(onnx_unet):
    ok, _ = tensorrt_status()
    if ok:
        pytest.skip("TensorRT is installed here")
    path, _ = onnx_unet
    with pytest.raises(EngineUnavailable, match="TensorRT is not installed"):
        open_engine(path, "trt", "cuda")


def test_ort_engine_disables_telemetry_and_an_unloadable_model_is_a_bundle_error(onnx_unet, monkeypatch, tmp_path: Path):
    import onnxruntime

    from plsynth.errors import BundleError

    calls = []
    monkeypatch.setattr(onnxruntime, "disable_telemetry_events", lambda: calls.append(True))
    open_engine(onnx_unet[0], "ort", "cpu")
    assert calls, "onnxruntime telemetry events are disabled before a session is created"
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not a model")
    with pytest.raises(BundleError, match="ONNX Runtime cannot load"):
        open_engine(broken, "ort", "cpu")


def test_openvino_runs_the_onnx_file_as_onnx_runtime_does_on_any_side_and_batch(tmp_path: Path):
    pytest.importorskip("openvino")
    from plsynth.errors import BundleError

    net = tiny_unet(0)
    path = tmp_path / "model.onnx"
    export_onnx(net, path, {"x": torch.zeros(1, 1, 32, 32)}, ["logits"], spatial=True)  # as lung-box bundles
    ov_engine = open_engine(path, "openvino", "cpu", threads=1)
    ort_engine = open_engine(path, "ort", "cpu", threads=1)
    assert isinstance(ov_engine, OpenVinoEngine) and ov_engine.provider.startswith("openvino ")
    assert ov_engine.provider.endswith("CPU f32")  # not left to bf16 on CPUs with AMX
    for shape in ((1, 1, 32, 32), (3, 1, 48, 32), (2, 1, 32, 64)):
        x = np.random.default_rng(shape[0]).random(shape, dtype=np.float32)
        a, b = ov_engine.run(x), ort_engine.run(x)
        assert a.shape == b.shape == shape
        assert np.max(np.abs(a - b)) < 1e-3
    first = ov_engine.run(x)
    ov_engine.run(np.zeros_like(x))
    assert np.array_equal(first, ov_engine.run(x)), "a result must not be overwritten by the next call"
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not a model")
    with pytest.raises(BundleError, match="OpenVINO cannot load"):
        open_engine(broken, "openvino", "cpu")


def test_openvino_writes_nothing_under_home_and_starts_no_telemetry(tmp_path: Path):
    """openvino's converter starts usage telemetry on import (a client id under $HOME/intel); the
    engine imports it without (a fresh process, as plsynth-infer's)."""
    import os
    import subprocess
    import sys

    pytest.importorskip("openvino")
    path = tmp_path / "model.onnx"
    export_onnx(tiny_unet(0), path, {"x": torch.zeros(1, 1, 32, 32)}, ["logits"])
    home = tmp_path / "home"
    home.mkdir()
    code = ("import sys, numpy as np; from plsynth.deploy.engines import open_engine; "
            f"open_engine({str(path)!r}, 'openvino', 'cpu', threads=1).run(np.zeros((1, 1, 32, 32), np.float32)); "
            "print(sorted(m for m in sys.modules if 'telemetry' in m and sys.modules[m] is not None))")
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "TF_BUILD", "JENKINS_URL")}
    done = subprocess.run([sys.executable, "-c", code], env={**env, "HOME": str(home)}, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert [p for p in home.rglob("*")] == []
    assert "openvino_telemetry" not in done.stdout, done.stdout
