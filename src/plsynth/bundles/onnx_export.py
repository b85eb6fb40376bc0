"""PyTorch -> ONNX export with a dynamic batch, and the parity checks that gate a bundle.

The export is generic over input names: the segmenter (``{"x": ...} -> ["logits"]``) and the
SEAN decoder (``{"onehot", "style"[, "noise"]} -> ["image"]``) go through the same code. Only
the batch axis is dynamic: spatial sizes stay fixed at the bundle's input size, which keeps
one TensorRT optimization profile.

Segmenter parity is measured on phantom chest slices (``plsynth.data.phantom``, windowed and
prepared as at inference), never on random tensors, because a mask-level check needs realistic
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
from plsynth.metrics import dice

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
    dynamo exporter); falls back to the dynamo exporter with ``external_data=False`` when the
    TorchScript exporter is unavailable. ``spatial``: height and width (axes 2, 3 of every input
    and output) dynamic too, for a fully convolutional network run on lung boxes of any size
    (TorchScript exporter only).
    """
    import torch

    module = module.eval()
    path = Path(path)
    names = list(example_inputs)
    args = tuple(example_inputs[n] for n in names)
    common = {"input_names": names, "output_names": output_names}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # the legacy exporter's notice
            # shape checks traced as constants are constant here: spatial sizes are fixed
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            dynamic_axes = {n: {0: "batch", **({2: "height", 3: "width"} if spatial else {})} for n in [*names, *output_names]}
            torch.onnx.export(module, args, str(path), **common, dynamic_axes=dynamic_axes, opset_version=OPSET,
                              dynamo=False)
    except (TypeError, RuntimeError) as exc:  # TorchScript exporter removed in a later torch
        logger.info("TorchScript ONNX exporter failed (%s); using the dynamo exporter", exc)
        batch = torch.export.Dim("batch", min=1, max=max_batch)
        torch.onnx.export(module, args, str(path), **common, dynamic_shapes={n: {0: batch} for n in names},
                          dynamo=True, external_data=False)
    import onnx

    onnx.checker.check_model(str(path))
    return path


def ort_options(threads: int = 0):
    """Session options of every plsynth ONNX Runtime session: ``threads`` intra-op threads (0 = ORT's
    default) and subnormals as zero in ORT's own threads (`torch_setup.flush_denormals` says why),
    set by ORT itself so that a session needs no torch in the process."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.add_session_config_entry("session.set_denormal_as_zero", "1")
    if threads:
        options.intra_op_num_threads = int(threads)
    return options


def ort_session(path: Path, threads: int = 0, providers: list[str] | None = None):
    """An ONNX Runtime session over ``path`` (CPU unless other providers are asked for)."""
    import onnxruntime as ort

    return ort.InferenceSession(str(path), ort_options(threads), providers=providers or ["CPUExecutionProvider"])


def parity_slices(size: int, window_hu: tuple[float, float], lung_handling: str) -> np.ndarray:
    """Phantom chest slices (6, 1, S, S) at a bundle's input size, prepared as at inference.

    The project's phantom (lesions forced on), windowed with the bundle's window, its lung
    handling applied; the middle slices, since the lowest show only the costophrenic rim.
    """
    from plsynth.data.phantom import make_phantom
    from plsynth.data.preprocess import to_model_input
    from plsynth.data.window import window_array

    phantom = make_phantom(1234, (12, size, size), lesions=True, name="parity")
    middle = slice(3, 9)
    unit = window_array(phantom.hu[middle], tuple(window_hu))
    return to_model_input(unit, phantom.lung[middle], size, lung_handling)


def logit_threshold(tau: float) -> float:
    """The logit at which sigmoid(logit) == tau (so masks need no sigmoid)."""
    return math.log(tau / (1.0 - tau))


def compare_masks(reference: np.ndarray, got: np.ndarray, threshold: float, what: str, source: Path) -> dict[str, float]:
    """Max abs difference and mask Dice of two (B, 1, S, S) logit arrays; BundleError below the gate."""
    cut = logit_threshold(threshold)
    result = {
        "max_abs_diff": float(np.max(np.abs(reference - got))),
        "mask_dice": dice(reference[:, 0] > cut, got[:, 0] > cut),
    }
    if result["mask_dice"] < PARITY_MIN_DICE:
        raise BundleError(
            f"{source}: {what} mask Dice {result['mask_dice']:.4f} < {PARITY_MIN_DICE} "
            f"(max abs diff {result['max_abs_diff']:.3g}); refusing this export"
        )
    return result


def check_parity(
    module: Any, onnx_path: Path, inputs: np.ndarray, threshold: float, input_name: str = "x"
) -> dict[str, float]:
    """Compare a U-Net's PyTorch and ONNX Runtime (CPU) outputs on ``inputs`` (B, 1, S, S).

    Returns {"max_abs_diff", "mask_dice", "slices", "threshold", "engine", "inputs"}; raises
    BundleError naming the file when the mask Dice is below PARITY_MIN_DICE.
    """
    import onnxruntime as ort
    import torch

    with torch.inference_mode():
        ref = module.eval()(torch.from_numpy(inputs)).float().numpy()
    session = ort_session(onnx_path, threads=max(1, torch.get_num_threads()))
    got = session.run(None, {input_name: inputs})[0]
    result = {
        **compare_masks(ref, got, threshold, "ONNX/PyTorch", onnx_path),
        "slices": int(inputs.shape[0]),
        "threshold": float(threshold),
        "engine": f"onnxruntime {ort.__version__} CPUExecutionProvider",
        "inputs": "phantom chest slices",
    }
    logger.info("parity %s: max abs diff %.3g, mask Dice %.4f", onnx_path.name, result["max_abs_diff"], result["mask_dice"])
    return result
