"""plsynth-infer end to end with real files: every input kind, geometry round trips, bad inputs,
exit codes, a run killed mid-case, and --continue.

The bundle holds two tiny U-Nets (width 4, depth 2, 32 px) trained for a few seconds on phantom
slices so that masks are not empty; volumes are small phantoms written with nibabel, SimpleITK
(DICOM) and PIL.
"""

from __future__ import annotations

import copy
import csv
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from plsynth.atomic import TEMP_PREFIX
from plsynth.config import Config, DataConfig, UNetConfig
from plsynth.data.phantom import _nifti, make_phantom
from plsynth.data.preprocess import resize_labels, to_model_input
from plsynth.deploy.engines import openvino_available
from plsynth.data.window import window_array
from plsynth.bundles.segmenter import write_bundle
from plsynth.errors import ExitCode

EXIT_BUNDLE, EXIT_CASES_FAILED, EXIT_ENGINE = ExitCode.BUNDLE, ExitCode.FAILED, ExitCode.ENGINE
from plsynth.models.unet import UNet

REPO = Path(__file__).resolve().parents[1]
SECRET = "Secret^Patientname"


def train_tiny(seed: int, x: torch.Tensor, y: torch.Tensor, steps: int = 150) -> UNet:
    torch.manual_seed(seed)
    net = UNet(UNetConfig(width=4, depth=2))
    opt = torch.optim.Adam(net.parameters(), lr=0.02)
    loss_fn = torch.nn.BCEWithLogitsLoss(pos_weight=torch.tensor(3.0))
    for step in range(steps):
        idx = torch.randint(0, len(x), (16,), generator=torch.Generator().manual_seed(seed * 1000 + step))
        loss = loss_fn(net(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.eval()


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    torch.set_num_threads(1)
    cfg = Config(data=DataConfig(image_size=32), model=UNetConfig(width=4, depth=2))
    xs, ys = [], []
    for seed in range(3):
        p = make_phantom(100 + seed, (12, 64, 64), lesions=True)
        xs.append(to_model_input(window_array(p.hu), p.lung, 32, "none"))
        ys.append(resize_labels(p.infection, 32)[:, None].astype(np.float32))
    x, y = torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys))
    model = train_tiny(0, x, y)  # ~0.8 Dice on its phantom slices after 150 steps
    peer = copy.deepcopy(model)  # a second, slightly different network (cheaper than training one)
    with torch.no_grad():
        peer.head.bias += 0.5
    nets = {"model": model, "peer": peer}
    return write_bundle(tmp_path_factory.mktemp("bundle") / "bundle", nets, cfg, {"note": "test"})


def phantom_nifti(path: Path, seed: int, shape=(8, 64, 64), affine: np.ndarray | None = None) -> Path:
    p = make_phantom(seed, shape, lesions=True)
    image = _nifti(p.hu, p.spacing, np.int16)
    if affine is not None:
        image = nib.Nifti1Image(np.asarray(image.dataobj), affine)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(image, path)
    return path


def phantom_slice(path: Path, seed: int) -> Path:
    p = make_phantom(seed, (12, 64, 64), lesions=True)
    z = int(np.argmax(p.infection.reshape(12, -1).sum(1)))
    Image.fromarray((window_array(p.hu[z]) * 255).round().astype(np.uint8)).save(path)
    return path


def dicom_series(folder: Path, seed: int, modality: str = "CT", drop: int | None = None) -> Path:
    import SimpleITK as sitk

    p = make_phantom(seed, (8, 64, 64), lesions=True)
    folder.mkdir(parents=True)
    volume = sitk.GetImageFromArray(p.hu.astype(np.int16))
    volume.SetSpacing((p.spacing[2], p.spacing[1], p.spacing[0]))
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    uid = "1.2.826.0.1.3680043.2.1125.777"
    for k in range(p.hu.shape[0]):
        s = volume[:, :, k]
        pos = volume.TransformIndexToPhysicalPoint((0, 0, k))
        for key, value in {"0010|0010": SECRET, "0010|0020": "ID-SECRET-42", "0008|0060": modality, "0020|000e": uid,
                           "0008|0018": f"{uid}.{k + 1}", "0020|0013": str(k + 1),
                           "0020|000d": f"{uid}.0", "0020|0052": f"{uid}.9",
                           "0020|0037": "1\\0\\0\\0\\1\\0", "0020|0032": "\\".join(f"{v:.4f}" for v in pos),
                           "0028|1052": "-1024", "0028|1053": "1", "0018|0050": str(p.spacing[0])}.items():
            s.SetMetaData(key, value)
        if k != drop:
            writer.SetFileName(str(folder / f"im{k:03d}.dcm"))
            writer.Execute(s)
    return folder


BIN = Path(sys.executable).parent  # the installed console scripts of this environment


@dataclass
class Run:
    exit_code: int
    output: str  # stdout and stderr together


def invoke(*args: str, script: str = "plsynth-infer", timeout: float = 300, env: dict | None = None) -> Run:
    """Run an installed console script as a user would (a subprocess), with OMP_NUM_THREADS=1."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    done = subprocess.run([str(BIN / script), *[str(a) for a in args]], capture_output=True, text=True, env=env,
                          timeout=timeout, stdin=subprocess.DEVNULL)
    return Run(done.returncode, done.stdout + done.stderr)


def rows(out: Path) -> dict[str, dict]:
    with open(out / "report.csv") as handle:
        return {r["case"]: r for r in csv.DictReader(handle)}


def test_openvino_runs_bfloat16_by_default_where_the_cpu_has_it_and_fp32_gives_onnx_runtimes_masks(
        bundle: Path, tmp_path: Path):
    """plsynth-infer on OpenVINO: by default both networks in bfloat16 where the CPU grants it (AMX /
    AVX-512 BF16; fp32 elsewhere), the provider saying which; ``--fp32`` gives ONNX Runtime's
    masks voxel for voxel."""
    pytest.importorskip("openvino")
    from plsynth.deploy.engines import import_openvino
    from plsynth.deploy.predictor import Predictor
    from plsynth.metrics import dice

    granted = "bf16" if "BF16" in import_openvino().Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES") else "f32"
    vol = phantom_nifti(tmp_path / "in" / "v.nii.gz", 21)
    masks, agreement, provider = {}, {}, {}
    for name, options in {"ort": ["--engine", "ort"], "fp32": ["--engine", "openvino", "--fp32"],
                          "default": ["--engine", "openvino"]}.items():
        result = invoke(vol, "-o", tmp_path / name, "--model", bundle, "--lung-backend", "classical", *options)
        assert result.exit_code == 0, result.output[-3000:]
        row = rows(tmp_path / name)["v"]
        assert row["engine"] == options[1]
        masks[name] = np.asarray(nib.load(tmp_path / name / "v.nii.gz").dataobj)
        agreement[name], provider[name] = float(row["agreement_dice"]), row["provider"]
    assert provider["fp32"].endswith("CPU f32") and provider["default"].endswith(f"CPU {granted}")
    assert masks["ort"].any() and np.array_equal(masks["ort"], masks["fp32"])
    assert abs(agreement["ort"] - agreement["fp32"]) <= 1e-3
    assert dice(masks["default"] > 0, masks["ort"] > 0) >= 0.95  # near fp32's; the gate on trained bundles: BENCHMARKS
    pred = Predictor.from_bundle(bundle, engine="openvino", device="cpu", lung_backend="classical")
    assert pred.engines["model"].precision == pred.engines["peer"].precision == "bf16"
    pred = Predictor.from_bundle(bundle, engine="openvino", device="cpu", lung_backend="classical", fp16=False)
    assert pred.engines["model"].precision == pred.engines["peer"].precision == "f32"


def test_every_input_kind_end_to_end(bundle: Path, tmp_path: Path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    vol = phantom_nifti(inputs / "vol.nii.gz", 1)
    phantom_nifti(inputs / "plain.nii", 2)
    phantom_slice(inputs / "slice.png", 3)
    phantom_slice(inputs / "photo.jpg", 4)
    dicom_series(tmp_path / "dicom" / "series-a", 5)
    out = tmp_path / "out"
    result = invoke(inputs, tmp_path / "dicom" / "series-a", "-o", out, "--model", bundle, "--overlays",
                    "--lung-backend", "classical", "--batch-size", "3")
    assert result.exit_code == 0, result.output
    report = rows(out)
    assert set(report) == {"vol", "plain", "slice", "photo", "series-a"}
    engine, provider = ("openvino", "openvino ") if openvino_available() else ("ort", "CPUExecutionProvider")
    assert all(r["status"] == "ok" and r["engine"] == engine and r["provider"].startswith(provider) for r in report.values())
    # volumes: mask in the input's geometry, infection only, ml figures; at least one finds infection
    written = nib.load(out / "vol.nii.gz")
    original = nib.load(vol)
    assert written.shape == original.shape and np.allclose(written.affine, original.affine)
    assert set(np.unique(np.asarray(written.dataobj))) <= {0, 1}
    assert nib.load(out / "plain.nii.gz").shape == (64, 64, 8)
    assert float(report["vol"]["lung_ml"]) > 0 and report["vol"]["percent_involved"] != ""
    assert any(float(report[c]["infection_ml"]) > 0 for c in ("vol", "plain", "series-a"))
    assert float(report["vol"]["lung_ml"]) == pytest.approx(
        float(report["vol"]["left_lung_ml"]) + float(report["vol"]["right_lung_ml"]), abs=0.01)
    # 2D slices: PNG 0/255 of the input's size, pixel figures, no ml
    png = np.asarray(Image.open(out / "slice.png"))
    assert png.shape == (64, 64) and set(np.unique(png)) <= {0, 255}
    assert report["slice"]["infection_ml"] == "" and report["slice"]["lung_px"] != ""
    assert (out / "photo.png").is_file()
    # DICOM: a NIfTI mask, the series segmented named by its UID; no patient tag anywhere in the outputs
    assert nib.load(out / "series-a.nii.gz").shape[:3] == (64, 64, 8)
    assert report["series-a"]["series_uid"] == "1.2.826.0.1.3680043.2.1125.777" and report["vol"]["series_uid"] == ""
    for name in ("report.csv", "report.json"):
        text = (out / name).read_text()
        assert "Secret" not in text and "SECRET" not in text
    assert "Secret" not in result.output
    # sub-folders: lungs and overlays; report.json has the run and the agreement flag
    assert (out / "lungs" / "vol.nii.gz").is_file() and (out / "overlays" / "vol.png").is_file()
    data = json.loads((out / "report.json").read_text())
    assert data["run"]["engine"] == engine and data["run"]["networks"] == ["model", "peer"]
    assert data["run"]["lung_backend"] == "classical"
    assert all(0.0 <= c["agreement_dice"] <= 1.0 for c in data["cases"])
    assert not [p for p in out.rglob(f"{TEMP_PREFIX}*")]


def test_torch_is_imported_only_where_it_runs(bundle: Path, tmp_path: Path):
    """The default CPU engine (OpenVINO, or ONNX Runtime where it is absent) with the classical lungs
    on a volume at the bundle's size (no resize, which is torch's F.interpolate) never imports
    torch, nor does a bad bundle: 1.2 s of start-up less per run here, and a container's
    plsynth-infer fails fast."""
    def imported(result: Run) -> set[str]:
        return {line.split("|")[-1].strip() for line in result.output.splitlines() if line.startswith("import time:")}

    profile = {"PYTHONPROFILEIMPORTTIME": "1"}
    vol = phantom_nifti(tmp_path / "v.nii.gz", 48, shape=(8, 32, 32))  # slices at the bundle's size
    result = invoke(vol, "-o", tmp_path / "out", "--model", bundle, "--lung-backend", "classical", env=profile)
    assert result.exit_code == 0, result.output[-3000:]
    engine = "openvino" if openvino_available() else "ort"
    assert rows(tmp_path / "out")["v"]["engine"] == engine
    assert {"openvino": "openvino", "ort": "onnxruntime"}[engine] in imported(result) and "torch" not in imported(result)
    (tmp_path / "empty").mkdir()
    result = invoke(vol, "-o", tmp_path / "out2", "--model", tmp_path / "empty", env=profile)
    assert result.exit_code == ExitCode.BUNDLE and "torch" not in imported(result)


def test_geometry_round_trips_for_flipped_and_oblique_affines(bundle: Path, tmp_path: Path):
    lps = phantom_nifti(tmp_path / "in" / "lps.nii.gz", 7)
    image = nib.load(lps)
    data = np.asarray(image.dataobj)
    # the same world image stored as RAS (x and y axes flipped in voxel order)
    ras_affine = image.affine @ np.array([[-1, 0, 0, 63], [0, -1, 0, 63], [0, 0, 1, 0], [0, 0, 0, 1]], float)
    nib.save(nib.Nifti1Image(data[::-1, ::-1].copy(), ras_affine), tmp_path / "in" / "ras.nii.gz")
    # an oblique scan: the LPS grid rotated 12 degrees about z
    c, s = np.cos(np.radians(12)), np.sin(np.radians(12))
    rot = np.array([[c, -s, 0, 0], [s, c, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
    nib.save(nib.Nifti1Image(data, rot @ image.affine), tmp_path / "in" / "oblique.nii.gz")
    out = tmp_path / "out"
    result = invoke(tmp_path / "in", "-o", out, "--model", bundle, "--lung-backend", "classical", "--no-agreement")
    assert result.exit_code == 0, result.output
    masks = {n: nib.load(out / f"{n}.nii.gz") for n in ("lps", "ras", "oblique")}
    for name, source in (("lps", lps), ("ras", tmp_path / "in" / "ras.nii.gz"), ("oblique", tmp_path / "in" / "oblique.nii.gz")):
        assert np.allclose(masks[name].affine, nib.load(source).affine)
    reference = np.asarray(masks["lps"].dataobj)
    assert reference.any(), "the tiny model should find some infection in a lesioned phantom"
    np.testing.assert_array_equal(np.asarray(masks["ras"].dataobj), reference[::-1, ::-1])
    np.testing.assert_array_equal(np.asarray(masks["oblique"].dataobj), reference)


def test_bad_inputs_fail_one_by_one_while_good_cases_finish(bundle: Path, tmp_path: Path):
    bad = tmp_path / "in"
    bad.mkdir()
    good = phantom_nifti(bad / "good.nii.gz", 8)
    (bad / "empty.nii.gz").write_bytes(b"")
    (bad / "truncated.nii.gz").write_bytes(good.read_bytes()[:300])
    (bad / "text.nii").write_text("this is not a NIfTI file\n" * 20)
    nib.save(nib.Nifti1Image(np.zeros((64, 64), np.int16), np.eye(4)), bad / "flat2d.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((16, 16, 8, 3), np.int16), np.eye(4)), bad / "fourd.nii.gz")
    nib.save(nib.Nifti1Image(np.full((16, 16, 8), np.nan, np.float32), np.eye(4)), bad / "nan.nii.gz")
    nib.save(nib.Nifti1Image(np.full((16, 16, 8), -1000, np.int16), np.eye(4)), bad / "nolung.nii.gz")
    (tmp_path / "folder.nii.gz").mkdir()
    out = tmp_path / "out"
    result = invoke(bad, tmp_path / "folder.nii.gz", "-o", out, "--model", bundle, "--lung-backend", "classical")
    assert result.exit_code == EXIT_CASES_FAILED, result.output
    report = rows(out)
    assert report["good"]["status"] == "ok" and (out / "good.nii.gz").is_file()
    failed = {c: r["error"] for c, r in report.items() if c != "good"}
    assert set(failed) == {"empty", "truncated", "text", "flat2d", "fourd", "nan", "nolung", "folder"}
    assert all(report[c]["status"] == "failed" and msg for c, msg in failed.items())
    assert "no lung" in failed["nolung"] and "folder" in failed["folder"] and "2D" in failed["flat2d"]
    for case in failed:
        assert not (out / f"{case}.nii.gz").exists()
        assert f"{case}: failed" in result.output


def test_exit_codes_for_bundle_input_and_engine_problems(bundle: Path, tmp_path: Path):
    vol = phantom_nifti(tmp_path / "v.nii.gz", 9)
    assert invoke(vol, "-o", tmp_path / "o").exit_code == EXIT_BUNDLE  # no --model, no PLSYNTH_MODEL
    import shutil

    tampered = shutil.copytree(bundle, tmp_path / "tampered")
    (tampered / "model.onnx").write_bytes((tampered / "model.onnx").read_bytes()[:-10])
    result = invoke(vol, "-o", tmp_path / "o", "--model", tampered)
    assert result.exit_code == EXIT_BUNDLE and "model.onnx" in result.output
    (tmp_path / "nothing").mkdir()
    empty = invoke(tmp_path / "nothing", "--model", bundle, "-o", tmp_path / "o3")
    assert empty.exit_code == EXIT_CASES_FAILED and rows(tmp_path / "o3")["nothing"]["status"] == "failed"
    result = invoke(vol, "-o", tmp_path / "o", "--model", bundle, "--engine", "trt")
    assert result.exit_code == EXIT_ENGINE and "--allow-fallback" in result.output
    result = invoke(vol, "-o", tmp_path / "o2", "--model", bundle, "--engine", "trt", "--allow-fallback",
                    "--lung-backend", "classical")
    assert result.exit_code == 0 and rows(tmp_path / "o2")["v"]["engine"] == "ort"
    assert invoke(vol, "--model", bundle, "--engine", "tensorrt").exit_code == 2


def test_torch_engine_reports_agreement_and_marks_cases_for_review(bundle: Path, tmp_path: Path, monkeypatch):
    vol = phantom_nifti(tmp_path / "in" / "v.nii.gz", 10)
    monkeypatch.setenv("PLSYNTH_MODEL", str(bundle))
    out = tmp_path / "out"
    result = invoke(vol, "-o", out, "--engine", "torch", "--review-below", "1.01", "--lung-backend", "classical")
    assert result.exit_code == 0, result.output
    row = rows(out)["v"]
    assert row["engine"] == "torch" and row["provider"] == "torch:cpu"
    assert row["review"] == "True" and "agree" in row["review_reason"]
    assert row["agreement_dice"] != ""


def _finished_cases(out: Path) -> set[str]:
    """Cases whose record is under its final name (pathlib's glob also matches the hidden
    temporary file (``atomic.TEMP_PREFIX``) a SIGKILL can leave behind mid-write; that is not a finished case)."""
    return {p.stem for p in (out / "cases").glob("*.json") if not p.name.startswith(TEMP_PREFIX)}


def _all_final_outputs_load(out: Path) -> int:
    """Every file under its final name loads completely; returns how many were checked."""
    count = 0
    for path in out.rglob("*"):
        if not path.is_file() or path.name.startswith(TEMP_PREFIX):
            continue
        if path.name.endswith(".nii.gz"):
            np.asarray(nib.load(path).dataobj).sum()
        elif path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix == ".csv":
            list(csv.DictReader(path.open()))
        elif path.suffix == ".png":
            Image.open(path).load()
        count += 1
    return count


def test_a_run_killed_mid_case_leaves_no_partial_output_and_continue_finishes(bundle: Path, tmp_path: Path):
    inputs = tmp_path / "in"
    for i in range(5):
        phantom_nifti(inputs / f"c{i}.nii.gz", 20 + i, shape=(16, 96, 96))
    out = tmp_path / "out"
    cmd = [sys.executable, "-c", "from plsynth.deploy.infer_cli import main; main()", str(inputs), "-o", str(out),
           "--model", str(bundle), "--lung-backend", "classical", "--overlays", "--batch-size", "2", "--threads", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        if (out / "cases").is_dir() and _finished_cases(out):
            break
        time.sleep(0.05)
    time.sleep(0.3)  # land somewhere inside the next case
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed; make the cases larger"
    assert _all_final_outputs_load(out) >= 1
    done_before = _finished_cases(out)
    assert 1 <= len(done_before) < 5
    result = invoke(inputs, "-o", out, "--model", bundle, "--lung-backend", "classical", "--overlays", "--continue")
    assert result.exit_code == 0, result.output
    data = json.loads((out / "report.json").read_text())
    statuses = {c["case"]: c["status"] for c in data["cases"]}
    assert set(statuses) == {f"c{i}" for i in range(5)}
    assert {c for c, s in statuses.items() if s == "ok"} == {f"c{i}" for i in range(5)}
    for i in range(5):
        assert (out / f"c{i}.nii.gz").is_file()
    assert all(f"{case}: skipped" in result.output for case in done_before)
    _all_final_outputs_load(out)


def test_continue_skips_finished_cases_and_retries_failed_ones(bundle: Path, tmp_path: Path):
    inputs = tmp_path / "in"
    phantom_nifti(inputs / "a.nii.gz", 30)
    (inputs / "b.nii.gz").write_bytes(b"broken")
    out = tmp_path / "out"
    first = invoke(inputs, "-o", out, "--model", bundle, "--lung-backend", "classical")
    assert first.exit_code == EXIT_CASES_FAILED
    mtime = (out / "a.nii.gz").stat().st_mtime_ns
    phantom_nifti(inputs / "b.nii.gz", 31)  # the user fixes b
    second = invoke(inputs, "-o", out, "--model", bundle, "--lung-backend", "classical", "--continue")
    assert second.exit_code == 0, second.output
    assert (out / "a.nii.gz").stat().st_mtime_ns == mtime, "a finished case is not redone"
    report = rows(out)
    assert report["a"]["status"] == "ok" and report["b"]["status"] == "ok" and (out / "b.nii.gz").is_file()
    assert "a: skipped" in second.output


def test_help_is_instant_and_names_the_defaults():
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", "from plsynth.deploy.infer_cli import main; main()", "--help"],
                            capture_output=True, text=True, encoding="utf-8", timeout=60)
    assert result.returncode == 0 and "PLSYNTH_MODEL" in result.stdout and "--continue" in result.stdout
    assert time.perf_counter() - started < 10


def test_continue_redoes_a_case_whose_input_or_bundle_changed(bundle: Path, tmp_path: Path):
    import shutil

    inputs, out = tmp_path / "in", tmp_path / "out"
    phantom_nifti(inputs / "a.nii.gz", 40)
    args = ["-o", out, "--lung-backend", "classical", "--no-agreement", "--continue"]
    assert invoke(inputs, "--model", bundle, *args).exit_code == 0
    first = rows(out)["a"]
    phantom_nifti(inputs / "a.nii.gz", 41)  # another patient under the same name
    second = invoke(inputs, "--model", bundle, *args)
    assert second.exit_code == 0 and "a: ok" in second.output and "a: skipped" not in second.output
    assert rows(out)["a"]["input_sha256"] != first["input_sha256"]
    assert invoke(inputs, "--model", bundle, *args).output.count("a: skipped") == 1  # same input, same bundle
    other = shutil.copytree(bundle, tmp_path / "other-bundle")
    meta = json.loads((other / "meta.json").read_text())
    (other / "meta.json").write_text(json.dumps({**meta, "threshold": 0.4}))  # another model: another sha256
    third = invoke(inputs, "--model", other, *args)
    assert third.exit_code == 0 and "a: ok" in third.output
    assert rows(out)["a"]["bundle_sha256"] != first["bundle_sha256"]
    # another engine or precision (the report's provider): the mask and its row are made again
    fourth = invoke(inputs, "--model", other, *args, "--engine", "torch")
    assert fourth.exit_code == 0 and "a: ok" in fourth.output and rows(out)["a"]["provider"] == "torch:cpu"
    assert invoke(inputs, "--model", other, *args, "--engine", "torch").output.count("a: skipped") == 1


def test_a_second_run_into_a_locked_out_gets_a_clear_error_naming_the_holder(bundle: Path, tmp_path: Path):
    import socket

    from plsynth.atomic import folder_lock

    vol = phantom_nifti(tmp_path / "v.nii.gz", 42)
    out = tmp_path / "out"
    with folder_lock(out, "test holder"):
        result = invoke(vol, "-o", out, "--model", bundle, "--lung-backend", "classical")
        assert result.exit_code == ExitCode.LOCKED, result.output
        assert f"pid {os.getpid()}" in result.output and socket.gethostname() in result.output
        assert "Traceback" not in result.output and not (out / "v.nii.gz").exists()
        run = tmp_path / "run"
        with folder_lock(run, "test holder"):
            trained = invoke("train", "baseline", "--config", REPO / "configs" / "phantom-smoke.yaml", "--out", run,
                             script="plsynth")
            assert trained.exit_code == ExitCode.LOCKED and f"pid {os.getpid()}" in trained.output, trained.output
    assert invoke(vol, "-o", out, "--model", bundle, "--lung-backend", "classical").exit_code == 0  # released


def _broken_bundles(bundle: Path, root: Path) -> dict[str, Path]:
    """Bundles whose sha256s all match meta.json, broken in ways the hash check cannot see."""
    import hashlib
    import shutil

    def variant(name: str, change) -> Path:
        copy = shutil.copytree(bundle, root / name)
        meta = json.loads((copy / "meta.json").read_text())
        change(copy, meta)
        (copy / "meta.json").write_text(json.dumps(meta))
        return copy

    def bad_onnx(folder: Path, meta: dict) -> None:
        (folder / "model.onnx").write_bytes(b"not an onnx model" * 10)
        meta["files"]["model.onnx"] = hashlib.sha256((folder / "model.onnx").read_bytes()).hexdigest()

    def symlink(folder: Path, meta: dict) -> None:
        target = root / "outside.onnx"
        shutil.copy(folder / "model.onnx", target)
        (folder / "model.onnx").unlink()
        (folder / "model.onnx").symlink_to(target)

    return {
        "onnx that does not load": variant("bad-onnx", bad_onnx),
        "networks must be": variant("no-model", lambda f, m: m["networks"].pop("model")),
        "stored config": variant("bad-config", lambda f, m: m["config"]["model"].update(width="wide")),
        "symbolic link": variant("symlink", symlink),
        "malformed field": variant("bad-size", lambda f, m: m.update(image_size="large")),
    }


def test_bundle_faults_outside_the_hash_check_exit_4_with_a_message(bundle: Path, tmp_path: Path):
    vol = phantom_nifti(tmp_path / "v.nii.gz", 43)
    for expected, broken in _broken_bundles(bundle, tmp_path).items():
        result = invoke(vol, "-o", tmp_path / "out", "--model", broken, "--lung-backend", "classical")
        assert result.exit_code == ExitCode.BUNDLE, (expected, result.output)
        assert "bundle error" in result.output and "Traceback" not in result.output, result.output
        if expected != "onnx that does not load":
            assert expected in result.output, result.output
        else:
            assert ("OpenVINO cannot load" if openvino_available() else "ONNX Runtime cannot load") in result.output
            assert result.output.count("\n") <= 2, result.output  # one message, no library log lines


def test_an_output_that_cannot_be_written_fails_that_case_only(bundle: Path, tmp_path: Path):
    inputs, out = tmp_path / "in", tmp_path / "out"
    for name, seed in (("a", 44), ("b", 45), ("c", 46)):
        phantom_nifti(inputs / f"{name}.nii.gz", seed)
    (out / "b.nii.gz").mkdir(parents=True)  # a folder where b's mask goes: its write fails
    result = invoke(inputs, "-o", out, "--model", bundle, "--lung-backend", "classical", "--no-agreement")
    assert result.exit_code == ExitCode.FAILED, result.output
    report = rows(out)
    assert report["a"]["status"] == "ok" and report["c"]["status"] == "ok"
    assert report["b"]["status"] == "failed" and "cannot write output" in report["b"]["error"]
    assert not (out / "lungs" / "b.nii.gz").exists(), "the failed case's lung mask is removed, not left behind"
    assert "Traceback" not in result.output
    (tmp_path / "file").write_text("OUT is a file")
    result = invoke(inputs, "-o", tmp_path / "file", "--model", bundle)
    assert result.exit_code == ExitCode.USAGE and "cannot use output folder" in result.output
    assert "Traceback" not in result.output


def test_dicom_inputs_get_a_dicom_seg_alone_or_beside_the_nifti(bundle: Path, tmp_path: Path):
    import pydicom

    series = dicom_series(tmp_path / "in" / "series-b", 47)
    out = tmp_path / "out"
    args = ["-o", out, "--model", bundle, "--lung-backend", "classical", "--no-agreement"]
    result = invoke(series, *args, "--format", "dicom-seg")
    assert result.exit_code == 0, result.output
    row = rows(out)["series-b"]
    assert row["dicom_seg"] == "series-b.seg.dcm" and row["mask"] == ""
    assert not (out / "series-b.nii.gz").exists() and not (out / "lungs" / "series-b.nii.gz").exists()
    seg = pydicom.dcmread(out / "series-b.seg.dcm")
    assert seg.Modality == "SEG" and seg.ReferencedSeriesSequence[0].SeriesInstanceUID == row["series_uid"]
    assert "series-b: skipped" in invoke(series, *args, "--format", "dicom-seg", "--continue").output
    both = invoke(series, *args, "--format", "both", "--continue")  # the NIfTI is missing: the case is redone
    assert both.exit_code == 0 and "series-b: ok" in both.output
    assert (out / "series-b.nii.gz").is_file() and (out / "series-b.seg.dcm").is_file()
    assert SECRET not in (out / "report.csv").read_text()


def test_a_batch_mixing_good_and_every_bad_kind_finishes_every_good_case(bundle: Path, tmp_path: Path):
    """Good volumes of every readable kind beside every fault of issue 14: exit 1, each bad case named with its reason."""
    import bz2
    import gzip

    import SimpleITK as sitk

    inputs, out = tmp_path / "in", tmp_path / "out"
    good = {"vol": phantom_nifti(inputs / "vol.nii.gz", 50), "series": dicom_series(inputs / "series", 51)}
    plain = phantom_nifti(tmp_path / "plain.nii", 52)
    (inputs / "packed.nii.bz2").write_bytes(bz2.compress(plain.read_bytes()))
    sitk.WriteImage(sitk.ReadImage(str(plain)), str(inputs / "meta.mha"))
    os.symlink(dicom_series(tmp_path / "elsewhere" / "linked", 53), inputs / "linked")
    good.update(packed=inputs / "packed.nii.bz2", meta=inputs / "meta.mha", linked=inputs / "linked")
    crc = bytearray(phantom_nifti(inputs / "crc.nii.gz", 54).read_bytes())
    crc[-8] ^= 0xFF
    (inputs / "crc.nii.gz").write_bytes(bytes(crc))
    header = nib.Nifti1Header()
    header.set_data_shape((1024, 1024, 1000))
    header.set_data_dtype(np.int16)
    (inputs / "huge.nii.gz").write_bytes(gzip.compress(header.binaryblock + b"\0" * 4))
    dicom_series(inputs / "gap", 55, drop=4)
    dicom_series(inputs / "mr", 56, modality="MR")
    (inputs / "folder.nii.gz").mkdir()
    (inputs / "folder.nii.gz" / "readme.txt").write_text("not a volume")
    (inputs / "empty.nii.gz").write_bytes(b"")
    phantom_nifti(inputs / "blocked.nii.gz", 57)
    (out / "blocked.nii.gz").mkdir(parents=True)  # its mask cannot be written
    reasons = {"crc": "CRC", "huge": "--max-voxels", "gap": "not uniform", "mr": "Modality MR",
               "folder": "is a folder", "empty": "empty file", "blocked": "cannot write output"}
    result = invoke(inputs, "-o", out, "--model", bundle, "--lung-backend", "classical", "--no-agreement",
                    "--format", "both")
    assert result.exit_code == ExitCode.FAILED, result.output
    assert "Traceback" not in result.output
    report = rows(out)
    assert set(report) == set(good) | set(reasons)
    for case in good:
        assert report[case]["status"] == "ok", (case, report[case]["error"])
        assert (out / f"{case}.nii.gz").is_file()
    assert (out / "series.seg.dcm").is_file() and (out / "linked.seg.dcm").is_file()
    for case, reason in reasons.items():
        assert report[case]["status"] == "failed" and reason in report[case]["error"], (case, report[case]["error"])
        assert report[case]["input"] in report[case]["error"] or case == "blocked"
        assert f"{case}: failed" in result.output and reason in result.output
        if case != "blocked":
            assert not (out / f"{case}.nii.gz").exists()
        assert not (out / "lungs" / f"{case}.nii.gz").exists() and not (out / f"{case}.seg.dcm").exists()
    assert not list(out.rglob(f"{TEMP_PREFIX}*"))
    assert _all_final_outputs_load(out) > 0
