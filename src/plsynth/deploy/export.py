"""PyTorch -> ONNX export with a dynamic batch, and the parity check that gates a bundle.

The export is generic over input names so that the SEAN decoder service can use the same code
(`export_onnx(decoder, path, {"seg": ..., "style": ...}, ["image"])`). Only the batch axis is
dynamic: spatial sizes stay fixed at the bundle's input size, which keeps one TensorRT
optimization profile (field-anchors.md section 3).

Parity is measured on phantom chest slices (ellipse lungs with infection blobs in HU, windowed
like real inputs), never on random tensors, because a mask-level check needs realistic
activations: random inputs exercise none of the decision boundary that matters.
Gate: mask Dice >= 0.99 between PyTorch and ONNX Runtime (CPU) at the bundle's threshold.
"""

from __future__ import annotations

import logging
import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from plsynth.errors import BundleError

logger = logging.getLogger(__name__)

PARITY_MIN_DICE = 0.99
OPSET = 18


def export_onnx(
    module: Any,
    path: Path,
    example_inputs: dict[str, Any],
    output_names: list[str],
    max_batch: int = 64,
    spatial: bool = False,
) -> Path:
    """Export ``module`` (in eval mode) to one self-contained ONNX file with a dynamic batch axis.

    example_inputs: input name -> example tensor (its batch size is not baked in).
    Uses the TorchScript exporter at opset 18 (0.3 s for a U-Net, one file, same accuracy as the
    dynamo exporter in environment-notes.md section 3); falls back to the dynamo exporter with
    ``external_data=False`` when the TorchScript exporter is unavailable. ``spatial``: height and
    width (axes 2, 3 of every input and output) dynamic too, for a fully convolutional network
    run on lung boxes of any size (TorchScript exporter only).
    """
    import torch

    module = module.eval()
    names = list(example_inputs)
    args = tuple(example_inputs[n] for n in names)
    dynamic_axes = {n: {0: "batch", **({2: "height", 3: "width"} if spatial else {})} for n in [*names, *output_names]}
    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(
                module,
                args,
                str(path),
                input_names=names,
                output_names=output_names,
                dynamic_axes=dynamic_axes,
                opset_version=OPSET,
                dynamo=False,
            )
    except (TypeError, RuntimeError) as exc:  # TorchScript exporter removed in a later torch
        logger.info("TorchScript ONNX exporter failed (%s); using the dynamo exporter", exc)
        batch = torch.export.Dim("batch", min=1, max=max_batch)
        torch.onnx.export(
            module,
            args,
            str(path),
            input_names=names,
            output_names=output_names,
            dynamic_shapes={n: {0: batch} for n in names},
            dynamo=True,
            external_data=False,
        )
    import onnx

    onnx.checker.check_model(str(path))
    return path


def phantom_slices(size: int, count: int = 6, seed: int = 0) -> np.ndarray:
    """Phantom chest slices in [0, 1], shape (count, 1, size, size), and their lung labels.

    Body ellipse (soft tissue, ~40 HU) with two air-filled lungs (~-850 HU), each carrying
    ground-glass blobs (~-400 HU), windowed with the paper's window (-1250, 250) HU.
    Tries `plsynth.data.phantom.make_phantom` first (the project's phantoms); this local drawing
    is the fallback so that a bundle can be written without the data stage.
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    out = np.empty((count, 1, size, size), np.float32)
    for i in range(count):
        hu = np.full((size, size), -1000.0, np.float32)
        body = ((xx - 0.5) / 0.45) ** 2 + ((yy - 0.5) / 0.35) ** 2 <= 1
        hu[body] = 40.0
        for cx in (0.3, 0.7):
            lung = ((xx - cx) / 0.15) ** 2 + ((yy - 0.5) / 0.25) ** 2 <= 1
            hu[lung] = -850.0
            for _ in range(int(rng.integers(1, 4))):
                bx, by = cx + rng.uniform(-0.08, 0.08), 0.5 + rng.uniform(-0.15, 0.15)
                r = rng.uniform(0.02, 0.06)
                blob = lung & (((xx - bx) ** 2 + (yy - by) ** 2) <= r * r)
                hu[blob] = -400.0
        hu += rng.normal(0, 20, hu.shape).astype(np.float32)
        out[i, 0] = np.clip((hu + 1250.0) / 1500.0, 0.0, 1.0)
    return out


def mask_dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two boolean masks; 1.0 when both are empty (they agree perfectly)."""
    a, b = a.astype(bool), b.astype(bool)
    total = int(a.sum()) + int(b.sum())
    if total == 0:
        return 1.0
    return 2.0 * int((a & b).sum()) / total


def logit_threshold(tau: float) -> float:
    """The logit at which sigmoid(logit) == tau (so masks need no sigmoid)."""
    return math.log(tau / (1.0 - tau))


def check_parity(
    module: Any, onnx_path: Path, inputs: np.ndarray, threshold: float, input_name: str = "x"
) -> dict[str, float]:
    """Compare a U-Net's PyTorch and ONNX Runtime (CPU) outputs on ``inputs`` (B, 1, S, S).

    Returns {"max_abs_diff", "mask_dice", "slices", "threshold", "engine"}; raises BundleError
    naming the file when the mask Dice is below PARITY_MIN_DICE.
    """
    import onnxruntime as ort
    import torch

    with torch.inference_mode():
        ref = module.eval()(torch.from_numpy(inputs)).float().numpy()
    options = ort.SessionOptions()
    options.intra_op_num_threads = max(1, torch.get_num_threads())
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    got = session.run(None, {input_name: inputs})[0]
    cut = logit_threshold(threshold)
    result = {
        "max_abs_diff": float(np.max(np.abs(ref - got))),
        "mask_dice": mask_dice(ref > cut, got > cut),
        "slices": int(inputs.shape[0]),
        "threshold": float(threshold),
        "engine": f"onnxruntime {ort.__version__} CPUExecutionProvider",
        "inputs": "phantom chest slices",
    }
    if result["mask_dice"] < PARITY_MIN_DICE:
        raise BundleError(
            f"{onnx_path}: ONNX/PyTorch mask Dice {result['mask_dice']:.4f} < {PARITY_MIN_DICE} "
            f"(max abs diff {result['max_abs_diff']:.3g}); refusing to write this bundle"
        )
    logger.info("parity %s: max abs diff %.3g, mask Dice %.4f", onnx_path.name, result["max_abs_diff"], result["mask_dice"])
    return result


def export_run(run_dir: Path, out: Path | None = None, trt: bool = False, fp16: bool = False, batch_size: int = 8) -> Path:
    """Re-export a training run's checkpoint (``best.pt``, else ``last.pt``) as a bundle.

    The checkpoint is ``{"networks": {"model": state_dict[, "peer": ...]}, "config": cfg.to_dict(),
    "val": {...}, ...}`` (``plsynth.training.checkpoint``), read with ``weights_only=True``.
    The bundle goes to ``out`` (default ``run_dir/bundle``) through `write_bundle`, the same code
    training ends with. With ``trt``, TensorRT engines are built into the bundle's engine cache
    and checked against ONNX Runtime (needs TensorRT and a GPU; raises EngineUnavailable).
    """
    import torch

    from plsynth.config import saved_config
    from plsynth.deploy.bundle import write_bundle
    from plsynth.errors import InputError
    from plsynth.models.unet import UNet

    run_dir = Path(run_dir)
    source = next((run_dir / n for n in ("best.pt", "last.pt") if (run_dir / n).is_file()), None)
    if source is None:
        raise InputError(run_dir, "no best.pt or last.pt here; is this a training run folder?")
    try:
        state = torch.load(source, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001
        raise InputError(source, f"cannot read the checkpoint with weights_only=True: {exc}") from exc
    weights = state.get("networks") or state.get("models")
    if not isinstance(weights, dict) or "config" not in state:
        raise InputError(source, "checkpoint lacks 'networks' (or 'models') and 'config'")
    cfg = saved_config(state["config"], where=str(source))
    nets = {}
    for name, sd in weights.items():
        net = UNet(cfg.model)
        net.load_state_dict(sd)
        nets[name] = net.eval()
    val = state.get("val") or {}
    metrics = {"val_dice": val.get("dice"), "val_nsd": val.get("nsd"), "step": state.get("step"), "epoch": state.get("epoch")}
    bundle_dir = write_bundle(Path(out) if out else run_dir / "bundle", nets, cfg, metrics, {"exported_from": source.name})
    if trt:
        build_trt_engines(bundle_dir, fp16=fp16, batch_size=batch_size)
    return bundle_dir


def build_trt_engines(bundle_dir: Path, fp16: bool = False, batch_size: int = 8) -> dict[str, dict]:  # NEVER RUN HERE
    """Build (or reuse) the TensorRT engine of every network and check it against ONNX Runtime CPU
    on phantom slices (mask Dice >= 0.99, else BundleError). Returns parity per network."""
    from plsynth.deploy.bundle import load_bundle
    from plsynth.deploy.engines import OrtEngine
    from plsynth.deploy.tensorrt_engine import open_trt_engine, resolve_cache_dir

    bundle = load_bundle(bundle_dir)
    cache = resolve_cache_dir(bundle.path)
    slices = phantom_slices(bundle.image_size, count=min(batch_size, 6))
    cut = logit_threshold(bundle.threshold)
    report = {}
    for name in bundle.network_names:
        engine = open_trt_engine(bundle.onnx_path(name), batch_size, fp16, cache, bundle.onnx_sha256(name))
        ref = OrtEngine(bundle.onnx_path(name), ["CPUExecutionProvider"]).run(slices)
        got = engine.run(slices)
        report[name] = {"max_abs_diff": float(np.max(np.abs(ref - got))), "mask_dice": mask_dice(ref > cut, got > cut),
                        "precision": "fp16" if fp16 else "fp32", "provider": engine.provider}
        if report[name]["mask_dice"] < PARITY_MIN_DICE:
            raise BundleError(f"{bundle.onnx_path(name)}: TensorRT/ONNX mask Dice {report[name]['mask_dice']:.4f} < {PARITY_MIN_DICE}")
        logger.info("TensorRT parity %s: %s", name, report[name])
    return report
