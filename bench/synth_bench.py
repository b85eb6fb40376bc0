"""Synthesizer benchmark (not CI): decoder MACs per slice and throughput, torch vs ONNX Runtime.

MACs are counted with ``torch.utils.flop_counter.FlopCounterMode`` (conv / matmul / einsum
FLOPs, halved to multiply-accumulates; normalisation, activations and resizes are not counted),
at batch 1 with noise on. The paper preset (512 px, width 64, style 512) is counted on the
``meta`` device: shapes only, no arithmetic, so it costs nothing. Throughput is measured at
the CPU preset (configs/phantom-smoke.yaml's synth section) for the PyTorch decoder (eval,
inference_mode, spectral norm folded) and the exported ONNX file on ORT's CPU provider, in
the same process, alternating, median of ``--reps`` after one warm-up.

Usage: .venv/bin/python bench/synth_bench.py [--batch 8] [--reps 5] [--threads 2] [--out bench/results/synth_bench.md]
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

import machine

REPO = Path(__file__).resolve().parents[1]


def decoder_macs(config, device: str = "cpu") -> int:
    from plsynth.models.sean import SEANDecoder

    with torch.device(device):
        decoder = SEANDecoder(config).eval()
        s = config.image_size
        onehot = torch.zeros(1, 4, s, s)
        style = torch.zeros(1, 4, config.style_dim)
        noise = torch.zeros(1, 1, s, s) if config.noise else None
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        decoder(onehot, style, noise)
    return counter.get_total_flops() // 2


def params(config) -> int:
    from plsynth.models.sean import SEANDecoder

    with torch.device("meta"):
        return sum(p.numel() for p in SEANDecoder(config).parameters())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "synth_bench.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from plsynth.config import Config, SynthConfig, load_config
    from plsynth.models.sean import build_synthesizer, fold_spectral_norm
    from plsynth.bundles.synthesizer import export_decoder_onnx, ort_session, parity_inputs
    from plsynth.torch_setup import flush_denormals

    flush_denormals()  # as every plsynth entry point that runs networks does

    cpu = load_config(REPO / "configs" / "phantom-smoke.yaml").synth
    paper = SynthConfig()
    rows = []
    for name, config, device in (("CPU preset (phantom-smoke)", cpu, "cpu"), ("paper preset", paper, "meta")):
        rows.append((name, config, decoder_macs(config, device), params(config)))

    torch.manual_seed(0)
    decoder, _ = build_synthesizer(cpu)
    decoder.eval()
    folded = fold_spectral_norm(copy.deepcopy(decoder))
    inputs = parity_inputs(cpu, batch=args.batch, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = Path(tmp) / "decoder.onnx"
        t0 = time.perf_counter()
        export_decoder_onnx(decoder, onnx_path)
        export_s = time.perf_counter() - t0
        session = ort_session(onnx_path, threads=args.threads)
        feed = {k: v.numpy() for k, v in inputs.items()}
        with torch.inference_mode():
            ref = folded(**inputs).numpy()
        (got,) = session.run(["image"], feed)
        diff = float(abs(got - ref).max())
        times = {"torch": [], "ort": []}
        for rep in range(args.reps + 1):
            t = time.perf_counter()
            with torch.inference_mode():
                folded(**inputs)
            t_torch = time.perf_counter() - t
            t = time.perf_counter()
            session.run(["image"], feed)
            t_ort = time.perf_counter() - t
            if rep:  # first round is the warm-up
                times["torch"].append(t_torch)
                times["ort"].append(t_ort)
    med = {k: statistics.median(v) for k, v in times.items()}

    load = os.getloadavg()
    lines = [
        "# Synthesizer decoder benchmark",
        "",
        f"Command: `.venv/bin/python bench/synth_bench.py --batch {args.batch} --reps {args.reps} --threads {args.threads}`",
        f"Date: {datetime.datetime.now().isoformat(timespec='seconds')}; machine: {machine.describe()}; "
        f"threads {args.threads}; "
        f"load average at the end {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (the machine is shared: "
        "throughput figures are noisy when the load exceeds the 2 cores).",
        "",
        "## Decoder size and multiply-accumulates per slice (FlopCounterMode, conv/matmul/einsum, batch 1)",
        "",
        "| preset | size | width | style_dim | num_up | params | GMAC / slice |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, config, macs, n in rows:
        lines.append(
            f"| {name} | {config.image_size} | {config.width} | {config.style_dim} | {config.num_up} | "
            f"{n / 1e6:.2f} M | {macs / 1e9:.3f} |"
        )
    lines += [
        "",
        "The paper preset is counted on the meta device (shapes only). For scale: the official SEAN",
        "generator (ZPdesu/SEAN, ngf 64) is about 1.27 TMAC per 512 px slice; ours is lighter",
        "because the style branch projects per class to `norm_hidden` before the broadcast (see models/sean.py).",
        "",
        f"## Throughput at the CPU preset, batch {args.batch}, same process, alternating (median of {args.reps})",
        "",
        "| backend | ms / batch | slices / s |",
        "|---|---|---|",
        f"| PyTorch eager (inference_mode, spectral norm folded) | {med['torch'] * 1e3:.1f} | {args.batch / med['torch']:.1f} |",
        f"| ONNX Runtime CPU (legacy export, opset 18) | {med['ort'] * 1e3:.1f} | {args.batch / med['ort']:.1f} |",
        "",
        f"ONNX export took {export_s:.1f} s; max abs difference ORT vs torch at this batch: {diff:.2e}.",
        "",
        "Training time: see the `training` section of a bundle's meta.json (per-epoch seconds).",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    sys.stdout.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
