"""Inference benchmark: torch vs ONNX Runtime side by side, and one 512x512xN volume end to end.

    .venv/bin/python bench/infer_bench.py --slices 300 --side-by-side 64 --threads 2 --out bench/results/infer_bench.md

Model: the CPU preset U-Net (width 16, depth 4, 1.94 M parameters; environment-notes.md
section 3), untrained (speed does not depend on the weights), bundle written with the real
`write_bundle` at 512 px. Volumes are phantoms (plsynth.data.phantom) saved as int16 NIfTI.

1. Side by side: the same prepared (N, 1, 512, 512) inputs through TorchEngine (eval(),
   inference_mode) and OrtEngine (CPU), same threads and batch size; median of `--repeats`.
2. End to end: `Predictor.run` on the NIfTI (read, classical lungs, window, resize, engine,
   inverse resize, post-processing, mask + lungs written, report row) with one network, then
   the extra cost of the second network (SA-CPS agreement) measured on its own.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=300, help="slices of the end-to-end volume")
    parser.add_argument("--side-by-side", type=int, default=64, help="slices per side-by-side volume")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("bench/results/infer_bench.md"))
    args = parser.parse_args()

    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    from plsynth.config import Config, DataConfig, UNetConfig
    from plsynth.data.io import find_cases
    from plsynth.data.phantom import _nifti, _save_nifti, make_phantom
    from plsynth.data.preprocess import to_model_input
    from plsynth.data.window import window_array
    from plsynth.bundles.segmenter import load_bundle, write_bundle
    from plsynth.deploy.engines import OrtEngine, TorchEngine
    from plsynth.deploy.predictor import Predictor
    from plsynth.models.unet import UNet

    work = Path(tempfile.mkdtemp(prefix="plsynth-bench-"))
    cfg = Config(data=DataConfig(image_size=512), model=UNetConfig(width=16, depth=4))
    torch.manual_seed(0)
    nets = {"model": UNet(cfg.model).eval()}
    torch.manual_seed(1)
    nets["peer"] = UNet(cfg.model).eval()
    t0 = time.perf_counter()
    bundle_dir = write_bundle(work / "bundle", nets, cfg, {})
    export_s = time.perf_counter() - t0
    bundle = load_bundle(bundle_dir)

    # 1. side by side on the same inputs
    p = make_phantom(7, (args.side_by_side, 512, 512), lesions=True)
    x = to_model_input(window_array(p.hu), p.lung, 512, "none")
    torch_engine = TorchEngine(bundle.torch_networks()["model"], "cpu")
    ort_engine = OrtEngine(bundle.onnx_path("model"), ["CPUExecutionProvider"], threads=args.threads)

    def through(engine) -> float:
        started = time.perf_counter()
        for i in range(0, len(x), args.batch_size):
            engine.run(x[i : i + args.batch_size])
        return time.perf_counter() - started

    through(torch_engine), through(ort_engine)  # warm-up
    side: dict[str, list[float]] = {"torch": [], "ort": []}
    for _ in range(args.repeats):  # interleaved so that background load hits both alike
        side["torch"].append(through(torch_engine))
        side["ort"].append(through(ort_engine))
    med = {k: statistics.median(v) for k, v in side.items()}
    diff = float(np.max(np.abs(torch_engine.run(x[:4]) - ort_engine.run(x[:4]))))

    # 2. end to end
    t0 = time.perf_counter()
    big = make_phantom(11, (args.slices, 512, 512), lesions=True)
    volume = work / "in" / f"phantom-{args.slices}.nii.gz"
    _save_nifti(_nifti(big.hu, big.spacing, np.int16), volume)
    make_s = time.perf_counter() - t0
    lung_slices = int(big.lung.reshape(args.slices, -1).any(1).sum())
    del big, p, x
    one = Predictor.from_bundle(bundle_dir, engine="ort", device="cpu", batch_size=args.batch_size,
                                lung_backend="classical", agreement=False, threads=args.threads)
    started = time.perf_counter()
    row = next(one.run(find_cases([volume]), work / "out1")).row
    e2e = time.perf_counter() - started
    two = Predictor.from_bundle(bundle_dir, engine="ort", device="cpu", batch_size=args.batch_size,
                                lung_backend="classical", agreement=True, threads=args.threads)
    row2 = next(two.run(find_cases([volume]), work / "out2")).row

    cpu = _cpu_name()
    lines = [
        "# plsynth-infer benchmark",
        "",
        f"Command: `.venv/bin/python bench/infer_bench.py --slices {args.slices} --side-by-side {args.side_by_side} "
        f"--threads {args.threads} --batch-size {args.batch_size} --repeats {args.repeats}`",
        f"Date: {dt.datetime.now().isoformat(timespec='minutes')}; machine: {cpu}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}, torch {torch.__version__}, onnxruntime {_ort_version()}; "
        f"{args.threads} threads; load average at the end {os.getloadavg()[0]:.2f}. torch and ORT are "
        "interleaved, so load hits both alike.",
        "",
        f"Model: U-Net width 16, depth 4, {cfg.model.norm} norm (1.94 M parameters), untrained; input 512x512; bundle export + parity {export_s:.1f} s.",
        "",
        f"## 1. torch vs ONNX Runtime (CPU), {args.side_by_side} slices of 512x512, batch {args.batch_size}, median of {args.repeats}",
        "",
        "| engine | wall time per volume (s) | slices / s | all runs (s) |",
        "|---|---|---|---|",
    ]
    for name in ("torch", "ort"):
        lines.append(f"| {name} | {med[name]:.2f} | {args.side_by_side / med[name]:.2f} | "
                     f"{', '.join(f'{v:.2f}' for v in side[name])} |")
    lines += [
        "",
        f"ORT speed-up over torch: **{med['torch'] / med['ort']:.2f}x** (target >= 2x). Max abs logit difference {diff:.2g}.",
        "",
        f"## 2. End to end, one 512x512x{args.slices} phantom NIfTI (int16), classical lungs, ORT CPU",
        "",
        f"Phantom drawn and saved in {make_s:.1f} s (not part of the timing). {lung_slices} of {args.slices} slices hold lung "
        "and go through the network.",
        "",
        "| measure | seconds |",
        "|---|---|",
        f"| end to end, one network (read, lungs, network, post-processing, writes) | **{e2e:.1f}** |",
        f"| of which classical lung mask | {row['seconds_lungs']} |",
        f"| of which network (preprocess + engine + inverse resize + post-processing) | {row['seconds_network']} |",
        f"| second network for the SA-CPS agreement (extra, measured in a separate run) | {row2.get('seconds_agreement')} |",
        f"| end to end with both networks | {row2['seconds']} |",
        "",
        f"Target: <= 60 s with the classical lungs and one network: **{'met' if e2e <= 60 else 'NOT met'}**.",
        "lungmask was not timed: its weights cannot be downloaded here (environment-notes.md: lungmask with random "
        "weights took 15 s for 16x256x256 on these 2 cores, so expect minutes for 300x512x512 on CPU).",
        "",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


if __name__ == "__main__":
    main()
