"""Validation during training and ``plsynth eval``: per-case and mean Dice (DSC) and NSD.

Cases with spacing are scored per volume in 3D with NSD at ``tolerance_mm`` (the COVID-19-20
challenge protocol, paper IV-A.2). Cases without spacing (2D slices such as COVID-SemiSeg) are
scored per slice, with the NSD tolerance read in pixels (1 pixel by default); reports say so.
Empty-mask conventions are those of `plsynth.metrics` (both empty: 1.0, one empty: 0.0).

Inputs are the prepared slices of `plsynth.data.datasets` (resized, windowed to [0, 1], and
lung-handled by the data layer exactly as the training slices), so scores are at the training
resolution ``data.image_size``; predictions are kept inside the cached lung masks, as plsynth-infer
keeps them inside the same back-end's lungs.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch

from plsynth.config import Config, TrainConfig
from plsynth.data.lungs import inside_lungs
from plsynth.data.preprocess import FieldOfView
from plsynth.metrics import score_case, score_slices

logger = logging.getLogger(__name__)


@torch.no_grad()
def predict_slices(net: torch.nn.Module, images: Any, threshold: float = TrainConfig.tau, batch_size: int = 16,
                   lung: Any = None, view: FieldOfView = FieldOfView()) -> np.ndarray:
    """Binary masks (Z, S, S) uint8 for images (Z, 1, S, S) in [0, 1]; the net is put in eval mode.

    With ``view.lung_box`` every slice is run on the volume's lung box (`volume_box` of ``lung``
    (Z, S, S)), as plsynth-infer runs it.
    """
    from plsynth.data.preprocess import volume_box

    was_training = net.training
    net.eval()
    device = next(net.parameters()).device
    images = torch.as_tensor(np.asarray(images), dtype=torch.float32)
    size = images.shape[-1]
    y0, y1, x0, x1 = 0, size, 0, size
    if view.lung_box is not None:
        y0, y1, x0, x1 = volume_box(np.asarray(lung), size, view.lung_box, view.multiple)
    masks = torch.zeros((images.shape[0], size, size), dtype=torch.uint8)
    for start in range(0, images.shape[0] if y1 > y0 else 0, batch_size):
        logits = net(images[start : start + batch_size, :, y0:y1, x0:x1].to(device))
        masks[start : start + batch_size, y0:y1, x0:x1] = (torch.sigmoid(logits)[:, 0] >= threshold).to(torch.uint8).cpu()
    net.train(was_training)
    return masks.numpy()


def score_cases(
    net: torch.nn.Module, cases: Iterable[Any], tolerance_mm: float = TrainConfig.tolerance_mm, threshold: float = TrainConfig.tau, batch_size: int = 16,
    view: FieldOfView = FieldOfView(),
) -> list[dict[str, Any]]:
    """One row per scored unit: {"case", "dice", "nsd", "unit", "spacing"}.

    ``unit`` is "volume" (3D, tolerance in mm) or "slice" (no spacing, tolerance in pixels).
    """
    rows: list[dict[str, Any]] = []
    for case in cases:
        # clipped to the lungs as plsynth-infer clips (same lung function, cached at training size),
        # so the score is what a hospital gets
        pred = inside_lungs(predict_slices(net, case.image, threshold, batch_size, case.lung, view), case.lung)
        ref = (np.asarray(case.label) > 0).astype(np.uint8)
        if case.spacing is not None:
            scores = score_case(pred, ref, tuple(case.spacing), tolerance_mm)
            rows.append({"case": case.name, "unit": "volume", **scores, "spacing": list(case.spacing)})
        elif pred.shape[0] == 1:
            rows.append({"case": case.name, "unit": "slice", **score_case(pred[0], ref[0], None, tolerance_mm), "spacing": None})
        else:
            for z, scores in enumerate(score_slices(pred, ref, None, tolerance_mm)):
                rows.append({"case": f"{case.name}[{z}]", "unit": "slice", **scores, "spacing": None})
    return rows


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Means over rows (plain means: metrics never return NaN) plus the row count."""
    if not rows:
        return {"dice": float("nan"), "nsd": float("nan"), "cases": 0}
    return {
        "dice": float(np.mean([r["dice"] for r in rows])),
        "nsd": float(np.mean([r["nsd"] for r in rows])),
        "cases": len(rows),
    }


def validate(
    net: torch.nn.Module, cases: Iterable[Any], tolerance_mm: float = TrainConfig.tolerance_mm, threshold: float = TrainConfig.tau, batch_size: int = 16,
    view: FieldOfView = FieldOfView(),
) -> dict[str, Any]:
    """Score ``net`` on held-out cases: ``{"dice", "nsd", "cases", "per_case": rows}``."""
    rows = score_cases(net, cases, tolerance_mm, threshold, batch_size, view)
    return {**summarize(rows), "per_case": rows}


def evaluate_bundle(model: Path, cfg: Config, split: str = "val", out: Path | None = None) -> dict[str, Any]:
    """Score a segmenter bundle on a split of ``cfg``'s data (what ``plsynth eval`` runs).

    Writes ``out/metrics.csv`` (per case, then a ``mean`` row) and ``out/metrics.json`` when
    ``out`` is given; logs the table either way. The data layer's caches go to ``out`` (or the
    bundle's run folder when ``out`` is None).
    """
    from plsynth.data.datasets import build_splits
    from plsynth.bundles.segmenter import load_bundle

    model = Path(model)
    bundle = load_bundle(model)
    if bundle.image_size != cfg.data.image_size:
        raise ValueError(
            f"{model}: bundle input size {bundle.image_size} differs from data.image_size {cfg.data.image_size} "
            f"in {cfg.source or 'the config'}; evaluate with the config the model was trained with"
        )
    net = bundle.torch_networks()["model"]
    work = Path(out) if out is not None else model.resolve().parent
    splits = build_splits(cfg, work)
    if split == "val":
        cases = splits.val
    elif split == "test" and getattr(splits, "test", None) is not None:
        cases = splits.test
    else:
        raise ValueError(f"split must be 'val' (or 'test' where the data layout has one), got {split!r}")
    if not cases:
        raise ValueError(f"{cfg.source or 'config'}: the {split} split is empty; nothing to evaluate")
    rows = score_cases(net, cases, cfg.train.tolerance_mm, bundle.threshold, view=bundle.field_of_view)
    result = {
        "model": str(model),
        "split": split,
        "threshold": bundle.threshold,
        "tolerance": f"{cfg.train.tolerance_mm} mm" if rows[0]["unit"] == "volume" else f"{cfg.train.tolerance_mm} pixel(s)",
        **summarize(rows),
        "per_case": rows,
    }
    logger.info("%s", format_table(rows, result))
    if out is not None:
        from plsynth.atomic import atomic_write_text

        out = Path(out)
        atomic_write_text(out / "metrics.json", json.dumps(result, indent=2) + "\n")
        atomic_write_text(out / "metrics.csv", rows_to_csv(rows, result))
    return result


def rows_to_csv(rows: list[dict[str, Any]], mean: dict[str, Any]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["case", "unit", "dice", "nsd"])
    for r in rows:
        writer.writerow([r["case"], r["unit"], f"{r['dice']:.6f}", f"{r['nsd']:.6f}"])
    writer.writerow(["mean", f"{mean['cases']} cases", f"{mean['dice']:.6f}", f"{mean['nsd']:.6f}"])
    return buffer.getvalue()


def format_table(rows: list[dict[str, Any]], mean: dict[str, Any]) -> str:
    width = max([len(r["case"]) for r in rows] + [4])
    lines = [f"{'case':<{width}}  {'DSC':>6}  {'NSD':>6}"]
    lines += [f"{r['case']:<{width}}  {r['dice']:6.4f}  {r['nsd']:6.4f}" for r in rows]
    nsd_note = mean.get("tolerance", "")
    lines.append(f"{'mean':<{width}}  {mean['dice']:6.4f}  {mean['nsd']:6.4f}  ({mean['cases']} cases; NSD at {nsd_note})")
    return "\n".join(lines)
