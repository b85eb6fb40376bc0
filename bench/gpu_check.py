"""One GPU check, ready to run: training, throughput and ONNX / TensorRT parity on CUDA in < 8 min.

    python bench/gpu_check.py [--out bench/results/gpu_check.json] [--budget-s 420]

Where torch sees a CUDA GPU, at the paper's 512 px preset (U-Net width 32 / depth 4, SEAN decoder
width 64 / style 512, batch 8 + 8; phantom data, an untrained synthesizer bundle of that size):

1. a few training steps of every method (baseline, cps, sa-cps, st, sa-st) in float32 and with
   AMP (``train.amp: auto``: bf16 where supported): seconds per step, peak GPU memory, finite loss;
2. segmenter and decoder throughput in torch CUDA (float32 and autocast), slices/s;
3. ONNX parity of both networks (the bundles' ONNX files) against the torch CUDA run, on ONNX
   Runtime's CPU provider and, where onnxruntime-gpu is installed, its CUDA provider;
4. TensorRT (where installed): both ONNX files built into engines, parity and throughput.

Every section records its result or its error (a check reports, it does not stop), sections that
would pass ``--budget-s`` are recorded as skipped, and everything goes into ONE JSON file.
Without CUDA it prints why and exits 0 (nothing to check). ``--cpu-smoke`` runs the same
sections on the CPU at the phantom-smoke sizes: how the tests exercise this file without a GPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from ray_bench import untrained_bundle  # noqa: E402

from plsynth.config import Config, DataConfig, load_config  # noqa: E402
from plsynth.training.loop import TrainHooks, amp_dtype  # noqa: E402
from plsynth.training.methods import METHODS  # noqa: E402

log = logging.getLogger("gpu_check")


class StepClock(TrainHooks):
    """Times each optimizer step and keeps the last loss."""

    def __init__(self, device: str) -> None:
        super().__init__(device=device)
        self.times: list[float] = []
        self.loss = float("nan")
        self._last = time.perf_counter()

    def after_step(self, step, terms):
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
        now = time.perf_counter()
        self.times.append(now - self._last)
        self._last, self.loss = now, terms["loss"]


def preset(cpu_smoke: bool) -> Config:
    """The paper's 512 px preset on phantoms (or the phantom-smoke preset for --cpu-smoke)."""
    if cpu_smoke:
        cfg = load_config(REPO / "configs" / "phantom-smoke.yaml", ["train.threads=1"])
    else:
        cfg = Config(name="gpu-check", data=DataConfig(layout="phantom", phantom_n=6, phantom_shape=(12, 256, 256),
                                                       val_fraction=0.34, labeled_fraction=0.5))
    return cfg.replace(train=dataclasses.replace(cfg.train, epochs=1, max_iters=3, checkpoint_every=0,
                                                 bundle_from="last", offline_batch=8))


def environment() -> dict[str, Any]:
    from plsynth.deploy.engines import available_ort_providers
    from plsynth.bundles.tensorrt_engine import tensorrt_status

    cuda = torch.cuda.is_available()
    trt_ok, trt_reason = tensorrt_status()
    return {
        "python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name(0) if cuda else None,
        "bf16_supported": bool(torch.cuda.is_bf16_supported()) if cuda else False,
        "ort_providers": available_ort_providers(), "tensorrt": trt_ok, "tensorrt_status": trt_reason,
    }


def _timed(fn: Callable[[], Any], device: str, repeats: int = 5) -> float:
    """Median seconds of ``fn`` after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def train_methods(cfg: Config, out: Path, device: str, data, synth_bundle: Path, amps: list[str]) -> dict:
    from plsynth.synth_service.local import LocalSynthesizer
    from plsynth.training.loop import train

    rows: dict[str, Any] = {}
    synth = LocalSynthesizer(synth_bundle, backend="torch", device=device)
    teacher = ""
    for method in METHODS:
        for amp in amps:
            key = f"{method}/amp-{amp}"
            run_cfg = cfg.replace(train=dataclasses.replace(cfg.train, method=method, amp=amp, device=device,
                                                            teacher=teacher),
                                  synth=dataclasses.replace(cfg.synth, bundle=str(synth_bundle)))
            hooks = StepClock(device)
            if device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
            keep_bundle = method == "baseline" and amp == amps[0]  # the ST teacher and the parity segmenter
            hooks._last = time.perf_counter()
            result = train(run_cfg, out / "train" / f"{method}-{amp}", hooks, data=data,
                                  synth=synth if method in ("sa-cps", "sa-st") else None, write_bundle=keep_bundle)
            if keep_bundle:
                teacher = str(result.bundle)
            steady = hooks.times[1:] or hooks.times
            rows[key] = {"steps": len(hooks.times), "step_s_median": statistics.median(steady),
                         "first_step_s": hooks.times[0], "loss": hooks.loss, "loss_finite": math.isfinite(hooks.loss),
                         "autocast": str(amp_dtype(amp, device)),
                         "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None}
    rows["segmenter_bundle"] = teacher
    return rows


def throughput(cfg: Config, device: str, synth_bundle: Path, amps: list[str]) -> dict:
    from plsynth.models.unet import UNet
    from plsynth.bundles.synthesizer import load_decoder_bundle, parity_inputs

    s, batch = cfg.data.image_size, 16
    net = UNet(cfg.model).to(device).eval()
    x = torch.rand(batch, 1, s, s, device=device)
    decoder = load_decoder_bundle(synth_bundle, device=device).decoder.eval()
    inputs = {k: v.to(device) for k, v in parity_inputs(decoder.config, batch=8).items()}
    rows = {}
    for amp in amps:
        dtype = amp_dtype(amp, device)

        def seg():
            with torch.inference_mode(), torch.autocast(torch.device(device).type, dtype=dtype, enabled=dtype is not None):
                net(x)

        def dec():
            with torch.inference_mode(), torch.autocast(torch.device(device).type, dtype=dtype, enabled=dtype is not None):
                decoder(inputs["onehot"], inputs["style"], inputs.get("noise"))

        rows[f"segmenter/amp-{amp}"] = {"batch": batch, "slices_per_s": batch / _timed(seg, device)}
        rows[f"decoder/amp-{amp}"] = {"batch": 8, "slices_per_s": 8 / _timed(dec, device)}
    return rows


def _engines(onnx: Path, env: dict) -> list[tuple[str, Callable[[], Any]]]:
    """(name, opener) of the ONNX engines to compare: ORT CPU, ORT CUDA and TensorRT where present."""
    from plsynth.deploy.engines import OrtEngine

    found = [("ort-cpu", lambda: OrtEngine(onnx, ["CPUExecutionProvider"], gpu_required=False, allow_fallback=False))]
    if "CUDAExecutionProvider" in env["ort_providers"]:
        found.append(("ort-cuda", lambda: OrtEngine(onnx, ["CUDAExecutionProvider"], gpu_required=True,
                                                    allow_fallback=False)))
    if env["tensorrt"] and torch.cuda.is_available():
        from plsynth.bundles.tensorrt_engine import open_trt_engine

        found.append(("tensorrt-fp32", lambda: open_trt_engine(onnx, batch_size=8, fp16=False)))
    return found


def segmenter_parity(bundle_path: str, device: str, env: dict) -> dict:
    from plsynth.bundles.onnx_export import parity_slices
    from plsynth.bundles.segmenter import load_bundle
    from plsynth.metrics import dice

    bundle = load_bundle(bundle_path)
    net = bundle.torch_networks(device)["model"]
    x = parity_slices(bundle.image_size, bundle.window_hu, bundle.lung_handling).astype(np.float32)
    with torch.inference_mode():
        expected = net(torch.from_numpy(x).to(device)).float().cpu().numpy()
    rows = {}
    for name, opener in _engines(bundle.onnx_path("model"), env):
        try:
            engine = opener()
            got = np.asarray(engine.run(x), dtype=np.float32)
            rows[name] = {"max_abs_logit_diff": float(np.abs(got - expected).max()),
                          "mask_dice_vs_torch": float(dice(got[:, 0] > 0, expected[:, 0] > 0)),
                          "slices_per_s": len(x) / _timed(lambda: engine.run(x), "cpu", repeats=3)}
        except Exception as exc:  # noqa: BLE001 - a check reports, it does not stop
            rows[name] = {"error": f"{type(exc).__name__}: {exc}"}
    return rows


def decoder_parity(synth_bundle: Path, device: str, env: dict) -> dict:
    from plsynth.bundles.synthesizer import load_decoder_bundle, parity_inputs

    bundle = load_decoder_bundle(synth_bundle, device=device)
    decoder = bundle.decoder.eval()
    inputs = parity_inputs(decoder.config, batch=4)
    with torch.inference_mode():
        expected = decoder(*(inputs[k].to(device) if k in inputs else None for k in ("onehot", "style", "noise")))
    expected = expected.float().cpu().numpy()
    rows = {}
    for name, opener in _engines(bundle.onnx_path, env):
        try:
            engine = opener()
            feeds = {k: v.numpy() for k, v in inputs.items()}
            if hasattr(engine, "run_named"):
                (got,) = engine.run_named(feeds)
            else:
                names = [i.name for i in engine.session.get_inputs()]
                (got,) = engine.session.run(["image"], {k: feeds[k] for k in names})
            rows[name] = {"max_abs_diff": float(np.abs(np.asarray(got) - expected).max())}
        except Exception as exc:  # noqa: BLE001
            rows[name] = {"error": f"{type(exc).__name__}: {exc}"}
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "gpu_check.json"), help="the results file")
    parser.add_argument("--work", default="", help="scratch folder (default: a temporary folder)")
    parser.add_argument("--budget-s", type=float, default=420.0, help="sections that would start after this are skipped")
    parser.add_argument("--cpu-smoke", action="store_true", help="run every section on the CPU at phantom-smoke "
                        "sizes (tests; no GPU figures)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not torch.cuda.is_available() and not args.cpu_smoke:
        print(f"gpu_check: no CUDA GPU visible to torch {torch.__version__} (CUDA build: {torch.version.cuda}); "
              "nothing to check on this machine. Run it where `python -c 'import torch; "
              "print(torch.cuda.is_available())'` prints True.")
        return 0
    import tempfile

    from plsynth.data.datasets import build_splits
    from plsynth.torch_setup import flush_denormals

    flush_denormals()
    t0 = time.perf_counter()
    device = "cpu" if args.cpu_smoke else "cuda"
    amps = ["off"] if args.cpu_smoke else ["off", "auto"]
    cfg = preset(args.cpu_smoke)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="plsynth-gpu-check-"))
    results: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "device": device,
                               "cpu_smoke": args.cpu_smoke, "environment": environment(),
                               "preset": {"image_size": cfg.data.image_size, "unet": dataclasses.asdict(cfg.model),
                                          "synth_width": cfg.synth.width, "style_dim": cfg.synth.style_dim,
                                          "batch": [cfg.train.batch_labeled, cfg.train.batch_unlabeled],
                                          "steps": cfg.train.max_iters}}

    def section(name: str, fn: Callable[[], Any]) -> Any:
        if time.perf_counter() - t0 > args.budget_s:
            results[name] = {"skipped": f"time budget of {args.budget_s:.0f} s used up"}
            return None
        s0 = time.perf_counter()
        try:
            results[name] = fn()
        except Exception as exc:  # noqa: BLE001 - one failed section must not hide the others
            log.exception("section %s failed", name)
            results[name] = {"error": f"{type(exc).__name__}: {exc}"}
        results.setdefault("seconds", {})[name] = round(time.perf_counter() - s0, 1)
        return results[name]

    data = section("data", lambda: build_splits(cfg, work / "data"))
    bundle = section("synth_bundle", lambda: untrained_bundle(cfg, work / "synth"))
    if not isinstance(results["data"], dict) and not isinstance(results["synth_bundle"], dict):  # both made
        results["data"] = {"labeled": len(data.labeled), "unlabeled": len(data.unlabeled), "val": len(data.val)}
        results["synth_bundle"] = str(bundle)
        trained = section("training", lambda: train_methods(cfg, work, device, data, bundle, amps))
        section("throughput", lambda: throughput(cfg, device, bundle, amps))
        segmenter = (trained or {}).get("segmenter_bundle") if isinstance(trained, dict) else None
        if segmenter:
            section("onnx_segmenter", lambda: segmenter_parity(segmenter, device, results["environment"]))
        section("onnx_decoder", lambda: decoder_parity(bundle, device, results["environment"]))
    results["total_s"] = round(time.perf_counter() - t0, 1)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(json.dumps({k: results[k] for k in ("device", "total_s", "seconds") if k in results}))
    print(f"gpu_check: results in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
