"""Inference benchmark: full frame vs lung box, fp32 vs INT8, torch vs ONNX Runtime, side by side.

    .venv/bin/python bench/infer_bench.py --slices 300 --threads 2 --out bench/results/infer_bench.md

Speed (always): an untrained 512 px two-network bundle (U-Net width 16, depth 4, instance norm:
the CPU preset's network; speed does not depend on the weights) written with the real
`write_bundle`, and one 512x512xN phantom saved as int16 NIfTI. Each variant runs
`Predictor.run` end to end (read, classical lungs, lung field, network, second network for the
agreement flag on every `AGREEMENT_EVERY`-th lung slice, post-processing, writes) in its own
process, so its peak RSS is its own:

- ``full``: a bundle trained on whole frames: every lung slice as the whole 512x512 frame, fp32;
- ``full-openvino-fp32``, ``full-openvino-bf16``: that bundle through OpenVINO in fp32 (``--fp32``) and
  in bfloat16 (what plsynth-infer runs by default on a CPU with AMX / AVX-512 BF16, ``--engine auto``);
- ``box``: the same weights in a bundle trained on lung boxes (``data.lung_box`` = ``--margin``
  model pixels): plsynth-infer cuts each slice's lung box (`lung_boxes`) from the frame, fp32;
- ``box-openvino-fp32``, ``box-openvino-bf16``: the same through OpenVINO, as above;
- ``box-int8``: the same on statically quantised INT8 networks (QDQ, per channel, calibrated
  on phantom slices): measured, NOT used by plsynth-infer (see the parity section).

GFLOP/s = the U-Net's FLOPs (counted per pixel on the torch module) over the seconds
inside the engine, as a fraction of the fp32 peak of a convolution probe on the same threads
(bfloat16 on AMX goes past that fp32 peak).
Dice of each variant's mask against the full-frame fp32 mask is on this untrained network, so
it only shows the mechanics; accuracy parity needs a trained bundle:

Parity (``--parity-bundle B --parity-inputs FILES``): a trained bundle on real inputs (the
COVID-SemiSeg validation slices, or phantom volumes); per input, Dice against B's own fp32 mask
(what plsynth-infer gives: whole frames, or lung boxes for a bundle trained on them) of B on
lung boxes (each margin in ``--margins``) or on whole frames, of B's INT8 networks (calibrated on
``--parity-calib`` files), of torch eager and of each ``--parity-reference`` bundle (as
plsynth-infer runs it: e.g. the same recipe trained on whole frames); and, where an input has
its reference mask beside it (``*_seg.nii.gz`` next to ``*_ct.nii.gz``), each one's Dice
against that truth. All through `Predictor.predict` on the input's grid.

Also: torch eager vs ORT on the same prepared 512x512 slices (``--side-by-side`` slices).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import machine

VARIANTS = ("full", "full-openvino-fp32", "full-openvino-bf16", "box", "box-openvino-fp32", "box-openvino-bf16", "box-int8")


class Timed:
    """An engine wrapper that adds up the seconds and the pixels it ran."""

    def __init__(self, engine) -> None:
        self.engine, self.name, self.provider = engine, engine.name, engine.provider
        self.seconds, self.pixels = 0.0, 0

    def run(self, x):
        started = time.perf_counter()
        out = self.engine.run(x)
        self.seconds += time.perf_counter() - started
        self.pixels += int(x.shape[0] * x.shape[2] * x.shape[3])
        return out


def peak_rss_gb() -> float:
    """This process's peak resident memory: VmHWM (ru_maxrss would include the parent's peak, which
    Linux carries across fork and exec)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def flops_per_pixel(net) -> float:
    """FLOPs (2 x multiply-adds of every convolution) per input pixel; a U-Net's cost is linear in pixels."""
    import torch

    total = [0]

    def hook(module, inputs, output):
        kernel = module.weight.shape[2] * module.weight.shape[3]
        cin = module.in_channels // module.groups
        where = output if isinstance(module, torch.nn.Conv2d) else inputs[0]  # transposed: per input position
        total[0] += 2 * where.shape[2] * where.shape[3] * kernel * cin * module.out_channels

    handles = [m.register_forward_hook(hook) for m in net.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d))]
    with torch.inference_mode():
        net(torch.zeros(1, 1, 64, 64))
    for h in handles:
        h.remove()
    return total[0] / (64 * 64)


def touch_gbps(size_mb: int = 256, rounds: int = 6) -> tuple[float, float]:
    """(GB/s writing fresh pages, GB/s writing the same pages again): what a volume's new arrays
    cost on this machine. Run in a child process of its own; every block stays allocated, so each
    one is memory this process never had (as a volume's growing peak is)."""
    import numpy as np

    blocks, fresh = [], []
    for _ in range(rounds):
        started = time.perf_counter()
        blocks.append(np.empty(size_mb * 2**20, np.uint8))
        blocks[-1].fill(1)
        fresh.append(size_mb / 1024 / (time.perf_counter() - started))
    started = time.perf_counter()
    blocks[0].fill(2)
    return statistics.median(fresh), size_mb / 1024 / (time.perf_counter() - started)


def peak_gflops(threads: int, seconds: float = 3.0) -> float:
    """fp32 GFLOP/s of one 3x3 convolution (64 -> 64 channels, 128x128) in ONNX Runtime on ``threads``
    threads, best of ``seconds``: the peak probe. ORT's own kernels (MLAS) pick the CPU's widest
    vector unit on any vendor, where torch's MKL matmul runs far below peak on AMD CPUs."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    w = np.random.default_rng(0).standard_normal((64, 64, 3, 3)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])], "probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64, 128, 128])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64, 128, 128])], [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(1).random((1, 64, 128, 128), dtype=np.float32)
    session.run(None, {"x": x})
    flops, best, end = 2 * 64 * 64 * 9 * 128 * 128, 0.0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        started = time.perf_counter()
        session.run(None, {"x": x})
        best = max(best, flops / (time.perf_counter() - started) / 1e9)
    return best


def quantize(onnx_path: Path, out: Path, calib) -> Path:
    """Static INT8 (QDQ, per-channel int8 weights, uint8 activations, min-max) calibrated on ``calib`` (N, 1, H, W)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{"x": calib[i : i + 4]} for i in range(0, len(calib), 4)])

        def get_next(self):
            return next(self.batches, None)

    pre = out.with_name(out.stem + "-pre.onnx")
    with contextlib.chdir(out.parent):  # ORT's quantisation tools leave temporaries in the working folder
        quant_pre_process(str(onnx_path), str(pre), skip_symbolic_shape=True)  # dynamic H/W: ONNX shape inference only
        quantize_static(str(pre), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    pre.unlink()
    return out


def dynamic_onnx(bundle, folder: Path, calib=None) -> dict[str, dict[str, Path]]:
    """The bundle's networks re-exported with dynamic height/width (fp32), and quantised (int8) with ``calib``."""
    import torch

    from plsynth.bundles.onnx_export import export_onnx

    folder.mkdir(parents=True, exist_ok=True)
    out: dict[str, dict[str, Path]] = {"fp32": {}, "int8": {}}
    for name, net in bundle.torch_networks().items():
        size = bundle.image_size
        out["fp32"][name] = export_onnx(net, folder / f"{name}.onnx", {"x": torch.zeros(1, 1, size, size)}, ["logits"], spatial=True)
        if calib is not None:
            out["int8"][name] = quantize(out["fp32"][name], folder / f"{name}-int8.onnx", calib)
    return out


def predictor(bundle, files: dict[str, Path] | None, threads: int, batch_size: int, margin: int | None | str = "bundle",
              torch_engine: bool = False, openvino: str | None = None):
    """A Predictor over ``files`` (name -> ONNX) or the bundle's own ONNX, engines wrapped in `Timed`;
    ``margin``: the bundle's own field of view ("bundle"), whole frames (None) or lung boxes;
    ``openvino``: OpenVINO at that precision ("f32": ``--fp32``, "bf16": the default where the CPU has it)
    instead of ONNX Runtime."""
    from plsynth.deploy.engines import OpenVinoEngine, OrtEngine, TorchEngine
    from plsynth.deploy.predictor import Predictor

    files = files or {n: bundle.onnx_path(n) for n in bundle.network_names}
    if torch_engine:
        engines = {n: TorchEngine(net) for n, net in bundle.torch_networks().items()}
    elif openvino:  # as Predictor.from_bundle
        engines = {n: OpenVinoEngine(p, threads=threads, precision=openvino) for n, p in files.items()}
    else:
        engines = {n: OrtEngine(p, ["CPUExecutionProvider"], threads=threads, arena=False)  # as Predictor.from_bundle
                   for n, p in files.items()}
    return Predictor(bundle, {n: Timed(e) for n, e in engines.items()}, batch_size=batch_size,
                     lung_backend="classical", lung_box=margin)


def run_variant(args) -> None:
    """Child process: one variant end to end on the phantom; prints one JSON line."""
    import torch

    torch.set_num_threads(args.threads)
    from plsynth.data.io import find_cases
    from plsynth.bundles.segmenter import load_bundle

    work = args.work
    bundle = load_bundle(work / ("bundle-full" if args.variant.startswith("full") else "bundle-box"))
    onnx = json.loads((work / "onnx.json").read_text())
    files = {n: Path(p) for n, p in onnx["int8"].items()} if args.variant.endswith("int8") else None
    precision = {"openvino-fp32": "f32", "openvino-bf16": "bf16"}.get(args.variant.split("-", 1)[-1])
    pred = predictor(bundle, files, args.threads, args.batch_size, openvino=precision)  # its bundle's field of view
    started = time.perf_counter()
    result = next(pred.run(find_cases([work / "in" / "phantom.nii.gz"]), work / f"out-{args.variant}"))
    seconds = time.perf_counter() - started
    if result.status != "ok":
        raise SystemExit(f"{args.variant}: {result.error}")
    row = result.row
    started = time.perf_counter()  # the same volume again: a folder's next case, memory already the process's
    again = next(pred.run(find_cases([work / "in" / "phantom.nii.gz"]), work / f"out-{args.variant}-again"))
    seconds_again = time.perf_counter() - started
    print(json.dumps({
        "variant": args.variant, "seconds": seconds, "seconds_again": seconds_again, "again": again.status,
        "seconds_lungs": row["seconds_lungs"],
        "seconds_network": row["seconds_network"], "seconds_agreement": row.get("seconds_agreement"),
        "agreement": row.get("agreement_dice"),
        "engine": {n: {"seconds": e.seconds, "pixels": e.pixels} for n, e in pred.engines.items()},
        "peak_rss_gb": peak_rss_gb(),
        "mask": str(work / f"out-{args.variant}" / row["mask"]),
    }))


def speed_section(args, work: Path, lines: list[str]) -> None:
    import numpy as np
    import torch

    from plsynth.config import Config, DataConfig, UNetConfig
    from plsynth.data.phantom import _nifti, _save_nifti, make_phantom
    from plsynth.data.preprocess import to_model_input
    from plsynth.data.window import window_array
    from plsynth.bundles.segmenter import load_bundle, write_bundle
    from plsynth.deploy.engines import OrtEngine, TorchEngine
    from plsynth.deploy.settings import AGREEMENT_EVERY
    from plsynth.metrics import dice
    from plsynth.models.unet import UNet

    cfg = Config(data=DataConfig(image_size=512), model=UNetConfig(width=16, depth=4))
    torch.manual_seed(0)
    nets = {"model": UNet(cfg.model).eval()}
    torch.manual_seed(1)
    nets["peer"] = UNet(cfg.model).eval()
    flops = flops_per_pixel(nets["model"])
    write_bundle(work / "bundle-full", nets, cfg, {})
    boxed = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, lung_box=args.margin))
    write_bundle(work / "bundle-box", nets, boxed, {})
    bundle = load_bundle(work / "bundle-box")
    calib_ph = make_phantom(5, (16, 512, 512), lesions=True)
    calib = to_model_input(window_array(calib_ph.hu), calib_ph.lung, 512, "none")[2:14:2]
    onnx = dynamic_onnx(bundle, work / "dyn", calib)
    (work / "onnx.json").write_text(json.dumps({k: {n: str(p) for n, p in v.items()} for k, v in onnx.items()}))
    peak = peak_gflops(args.threads)

    # torch vs ORT on the same prepared slices (interleaved so load hits both alike)
    x = to_model_input(window_array(calib_ph.hu), calib_ph.lung, 512, "none")[: args.side_by_side]
    del calib_ph
    engines = {"torch": TorchEngine(bundle.torch_networks()["model"], "cpu"),
               "ort": OrtEngine(bundle.onnx_path("model"), ["CPUExecutionProvider"], threads=args.threads)}

    def through(engine) -> float:
        started = time.perf_counter()
        for i in range(0, len(x), args.batch_size):
            engine.run(x[i : i + args.batch_size])
        return time.perf_counter() - started

    for engine in engines.values():
        through(engine)  # warm-up
    side: dict[str, list[float]] = {k: [] for k in engines}
    for _ in range(args.repeats):
        for name, engine in engines.items():
            side[name].append(through(engine))
    med = {k: statistics.median(v) for k, v in side.items()}
    diff = float(np.max(np.abs(engines["torch"].run(x[:2]) - engines["ort"].run(x[:2]))))
    del engines, x

    # end to end, one process per variant
    big = make_phantom(11, (args.slices, 512, 512), lesions=True)
    (work / "in").mkdir(exist_ok=True)
    _save_nifti(_nifti(big.hu, big.spacing, np.int16), work / "in" / "phantom.nii.gz")
    lung_slices = int(big.lung.reshape(args.slices, -1).any(1).sum())
    del big
    touch = json.loads(subprocess.run([sys.executable, __file__, "--touch"], capture_output=True, text=True,
                                      check=True).stdout.strip().splitlines()[-1])
    runs = {}
    for variant in dict.fromkeys(["full", *args.variants]):  # full: the reference of the Dice column
        command = [sys.executable, __file__, "--variant", variant, "--work", str(work), "--threads", str(args.threads),
                   "--batch-size", str(args.batch_size), "--margin", str(args.margin)]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode:
            raise SystemExit(f"variant {variant} failed:\n{done.stderr[-3000:]}")
        runs[variant] = json.loads(done.stdout.strip().splitlines()[-1])
    import nibabel as nib

    masks = {v: np.asarray(nib.load(r["mask"]).dataobj) > 0 for v, r in runs.items()}

    lines += [
        f"Model: U-Net width 16, depth 4, {cfg.model.norm} norm, untrained (speed only), in two bundles: trained on whole "
        f"frames (`full`, `full-openvino-fp32`, `full-openvino-bf16`) and on lung boxes with margin {args.margin} "
        f"(`data.lung_box`; `box`, `box-openvino-fp32`, `box-openvino-bf16`, `box-int8`); "
        f"{flops * 512 * 512 / 1e9:.1f} GFLOP "
        f"per 512x512 slice (counted). fp32 peak of the convolution probe on {args.threads} threads: **{peak:.0f} GFLOP/s**.",
        "",
        f"## 1. End to end, one 512x512x{args.slices} phantom NIfTI (int16), classical lungs, ORT CPU, batch {args.batch_size}",
        "",
        f"{lung_slices} of {args.slices} slices hold lung. Default bundle = two networks, the second one (agreement "
        f"flag) on every {AGREEMENT_EVERY}th lung slice. Lung box margin {args.margin} model pixels. "
        "One network = end to end minus the second network's share. Each variant in a fresh process (the first "
        "volume of a plsynth-infer run), then the same volume again in that process (a folder's next case).",
        "",
        f"Memory on this machine (`touch_gbps`: 6 blocks of 256 MB kept, median, own process): writing fresh pages "
        f"{touch[0]:.2f} GB/s, the same pages again {touch[1]:.1f} GB/s: every GB a volume newly touches costs "
        f"~{1 / touch[0]:.0f} s here.",
        "",
        "| variant | one network, end to end (s) | default two-network bundle, end to end (s) | next volume, same process (s) | "
        "lungs + field (s) | network path, first net (s) | second net (s) | engine GFLOP/s (share of peak) | "
        "first net's pixels vs full frame | peak RSS (GB) | Dice vs full-frame fp32 (untrained net) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for variant, r in runs.items():
        engine_s = sum(e["seconds"] for e in r["engine"].values())
        pixels = sum(e["pixels"] for e in r["engine"].values())
        gflops = flops * pixels / engine_s / 1e9
        share = r["engine"]["model"]["pixels"] / runs["full"]["engine"]["model"]["pixels"]
        lines.append(
            f"| {variant} | {r['seconds'] - (r['seconds_agreement'] or 0):.1f} | **{r['seconds']:.1f}** | "
            f"{r['seconds_again']:.1f} | {r['seconds_lungs']:.1f} | "
            f"{r['seconds_network']:.1f} | {r['seconds_agreement'] or 0:.1f} | {gflops:.0f} ({gflops / peak:.0%}) | "
            f"{share:.2f} | {r['peak_rss_gb']:.2f} | {dice(masks[variant], masks['full']):.4f} |")
    lines += [
        "",
        "Target: the default two-network bundle <= 30 s, peak RSS <= 3 GB, masks at Dice >= 0.99 against full-frame fp32 "
        "(on trained networks: section 3).",
        "",
        f"## 2. torch vs ONNX Runtime (CPU), {args.side_by_side} slices of 512x512, batch {args.batch_size}, median of {args.repeats}",
        "",
        "| engine | seconds | slices / s | all runs (s) |",
        "|---|---|---|---|",
    ]
    for name in side:
        lines.append(f"| {name} | {med[name]:.2f} | {args.side_by_side / med[name]:.2f} | {', '.join(f'{v:.2f}' for v in side[name])} |")
    lines += ["", f"ORT speed-up over torch: **{med['torch'] / med['ort']:.2f}x**. Max abs logit difference {diff:.2g}.", ""]


def parity_section(args, work: Path, lines: list[str]) -> None:
    """Dice against the bundle's own fp32 mask (lung boxes, whole frames, INT8, torch, reference bundles) and the truth."""
    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    from plsynth.data.io import find_cases, read_image
    from plsynth.data.lungs import lung_field
    from plsynth.data.preprocess import to_model_input
    from plsynth.data.window import to_unit
    from plsynth.bundles.segmenter import load_bundle
    from plsynth.metrics import dice

    bundle = load_bundle(args.parity_bundle)
    base = predictor(bundle, None, args.threads, args.batch_size)  # as plsynth-infer runs it

    def prepared(path: Path):
        image = read_image(path)
        lungs = np.asarray(base.lung_fn(image)).astype(np.uint8)
        return image, lung_field(image, lungs) if lungs.any() else None

    calib = []
    for case in find_cases(args.parity_calib)[:32] if args.parity_calib else []:
        image, region = prepared(Path(case.path))
        if region is not None:
            unit = to_unit(image, bundle.window_hu, bundle.intensity, region)
            calib.append(to_model_input(unit, region, bundle.image_size, bundle.lung_handling))
    onnx = dynamic_onnx(bundle, work / "parity-onnx", np.concatenate(calib) if calib else None)
    own = "lung boxes" if bundle.lung_box is not None else "whole frames"
    variants = {f"{bundle.path.name}, {own}, ONNX Runtime fp32 (the reference)": base}
    if bundle.lung_box is not None:
        variants["same bundle, whole frames"] = predictor(bundle, onnx["fp32"], args.threads, args.batch_size, None)
    for m in args.margins:
        variants[f"same bundle, lung box margin {m}"] = predictor(bundle, onnx["fp32"], args.threads, args.batch_size, m)
    variants[f"same bundle, OpenVINO fp32, {own} (plsynth-infer --fp32)"] = predictor(
        bundle, None, args.threads, args.batch_size, openvino="f32")
    variants[f"same bundle, OpenVINO bf16, {own} (plsynth-infer's default where the CPU has it)"] = predictor(
        bundle, None, args.threads, args.batch_size, openvino="bf16")
    if onnx["int8"]:
        variants[f"same bundle, INT8, {own}"] = predictor(bundle, onnx["int8"], args.threads, args.batch_size)
    variants[f"same bundle, torch eager, {own}"] = predictor(bundle, None, args.threads, args.batch_size, torch_engine=True)
    for ref in args.parity_reference:
        other = load_bundle(ref)
        kind = "lung boxes" if other.lung_box is not None else "whole frames"
        variants[f"{Path(ref).name} ({other.meta.get('method')}, trained on {kind})"] = predictor(
            other, None, args.threads, args.batch_size)
    scores: dict[str, list[float]] = {k: [] for k in variants}
    truth: dict[str, list[float]] = {k: [] for k in variants}
    false: dict[str, list[int]] = {k: [] for k in variants}  # voxels marked on inputs whose truth is empty
    peer: dict[str, list[float]] = {k: [] for k in variants}
    share: dict[str, list[float]] = {k: [] for k in variants}
    differ: dict[str, list[tuple[int, int]]] = {k: [] for k in variants}  # (voxels that differ, reference mask's voxels)
    cases = find_cases(args.parity_inputs)
    for case in cases:
        image, region = prepared(Path(case.path))
        if region is None:
            continue
        seg = Path(str(case.path).replace("_ct.nii", "_seg.nii"))
        label = np.asarray(read_image(seg).array) > 0 if seg != Path(case.path) and seg.is_file() else None
        for pred in variants.values():
            pred.engines["model"].pixels = 0
        ref = base.predict(image, region)
        full_pixels = bundle.image_size ** 2 * int(region.reshape(len(region), -1).any(1).sum())  # whole lung frames
        for name, pred in variants.items():
            got = ref if pred is base else pred.predict(image, region)
            scores[name].append(dice(got.infection, ref.infection))
            differ[name].append((int((got.infection != ref.infection).sum()), int(ref.infection.sum())))
            if label is not None and label.any():
                truth[name].append(dice(got.infection, label))
            elif label is not None:
                false[name].append(int(got.infection.sum()))
            if ref.peer_infection is not None and got.peer_infection is not None:
                peer[name].append(dice(got.peer_infection, ref.peer_infection))
            share[name].append(pred.engines["model"].pixels / full_pixels)
    lines += [
        f"## 3. Parity on a trained bundle: Dice against its own fp32 mask as plsynth-infer gives it, on each input's grid",
        "",
        f"Bundle `{Path(args.parity_bundle).name}` ({bundle.meta.get('method')}, {bundle.image_size} px, "
        f"{bundle.config().model.norm} norm, trained on {own}"
        + (f" with margin {bundle.lung_box}" if bundle.lung_box is not None else "")
        + f", lung handling {bundle.lung_handling}); {len(scores[next(iter(scores))])} inputs "
        f"with lung out of {len(cases)}; INT8 calibrated on {sum(len(c) for c in calib)} slices of other inputs; "
        f"{len(next(iter(truth.values())))} inputs with infection in their reference mask, "
        f"{len(next(iter(false.values())))} without.",
        "",
        "| variant | mean Dice vs the bundle's mask | worst input | voxels that differ, most on one input (of its mask's) | "
        "mean Dice vs truth (inputs with infection) | "
        "voxels marked on inputs without infection | mean Dice (second network, its sampled slices) | "
        "network pixels vs whole lung frames |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in variants:
        s = np.array(scores[name])
        t = f"{np.mean(truth[name]):.4f}" if truth[name] else "-"
        f = ", ".join(str(v) for v in false[name]) or "-"
        p = f"{np.mean(peer[name]):.4f}" if peer[name] else "-"
        most = max(differ[name])
        lines.append(f"| {name} | {s.mean():.4f} | {s.min():.4f} | {most[0]} ({most[1]}) | {t} | {f} | {p} | "
                     f"{np.mean(share[name]):.2f} |")
    lines += ["", "Gate: Dice >= 0.99 (mean and worst input) for what plsynth-infer may run in place of the bundle's "
              "own fp32 mask (OpenVINO, INT8).", ""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=300, help="slices of the end-to-end volume")
    parser.add_argument("--side-by-side", type=int, default=8, help="slices in the torch vs ORT comparison")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--margin", type=int, default=16, help="lung box margin, model pixels (speed section)")
    parser.add_argument("--margins", type=int, nargs="*", default=[8, 16, 32], help="lung box margins (parity section)")
    parser.add_argument("--no-speed", action="store_true", help="skip the 512 px speed sections")
    parser.add_argument("--parity-bundle", type=Path, help="a trained bundle for the parity section")
    parser.add_argument("--parity-inputs", type=Path, nargs="*", default=[], help="inputs (files or folders) for parity")
    parser.add_argument("--parity-calib", type=Path, nargs="*", default=[], help="INT8 calibration inputs (not the parity inputs)")
    parser.add_argument("--parity-reference", type=Path, nargs="*", default=[],
                        help="other bundles compared as plsynth-infer runs them (e.g. the same recipe on whole frames)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/infer_bench.md"))
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS),
                        help="variants of the end-to-end section (full always runs)")
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--touch", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        return run_variant(args)
    if args.touch:
        return print(json.dumps(touch_gbps()))

    import onnxruntime
    import torch

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="plsynth-bench-"))
    lines = [
        "# plsynth-infer benchmark",
        "",
        f"Command: `.venv/bin/python {' '.join(['bench/infer_bench.py', *sys.argv[1:]])}`",
        f"Date: {dt.datetime.now().isoformat(timespec='minutes')}; machine: {machine.describe()}, onnxruntime {onnxruntime.__version__}; "
        f"{args.threads} threads; load average at the start {os.getloadavg()[0]:.2f}.",
        "",
    ]
    try:
        if not args.no_speed:
            speed_section(args, work, lines)
        if args.parity_bundle:
            parity_section(args, work, lines)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    lines.append(f"Benchmark wall time {time.perf_counter() - started:.0f} s; load average at the end {os.getloadavg()[0]:.2f}.")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
