"""Lungs vs lung field: how much true infection each keeps, what each costs on healthy lungs.

Side by side, in one run:
1. COVID-SemiSeg's labeled slices (expert infection masks): share of infection pixels inside the
   classical lungs and inside their lung field, pooled and on the worst slice; field area / lungs.
2. Phantoms in HU (true lungs known): infection-free volumes (field area / lungs, Dice of each
   against truth) and volumes with lesions (share of infection inside each).
3. With ``--bundle`` (a segmenter trained on COVID-SemiSeg): per-image Dice on the bundle's
   validation slices of the network alone (no clip), clipped to the lungs (the old plsynth-infer),
   clipped to the field (in process), and through the installed plsynth-infer; plus `plsynth eval`.
4. With ``--big Z Y X``: seconds for the lungs and for the field of one HU phantom of that shape.
5. With ``--unlabeled``: COVID-SemiSeg's 1600 unlabeled slices (no truth, darker windows, tight crops):
   how many slices have lungs covering under 20 % of the slice (both lungs fill about half of
   these chest crops) and how many have a field covering over 25 % of the frame border (lung
   reaching around the corners, over air or chest wall), with the mean lung and field shares.

Usage: .venv/bin/python bench/lung_field.py --root DIR [--bundle DIR --config FILE --cache DIR] [--n 6] [--unlabeled] [--skip-phantoms]
       [--big 300 512 512] [--out bench/results/lung_field.md]
``--root``: the COVID-SemiSeg folder (labeled/images, labeled/masks).
"""

from __future__ import annotations

import argparse
import datetime
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

import machine


def dice(a: np.ndarray, b: np.ndarray) -> float:
    from plsynth.metrics import dice as metric

    return metric(a, b)


def _slice_masks(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(classical lungs > 0, lung field > 0) of one 8-bit slice file, each (Y, X) bool."""
    from plsynth.data.io import read_image
    from plsynth.data.lungs import lung_field, lung_mask

    image = read_image(path)  # the product's reader: what plsynth-infer and the slice cache see
    lungs = lung_mask(image)
    return lungs[0] > 0, lung_field(image, lungs)[0] > 0


def semiseg_rows(root: Path) -> list[str]:
    totals = {"lungs": [0, 0], "field": [0, 0]}
    worst = {"lungs": 1.0, "field": 1.0}
    started = time.perf_counter()
    for path in sorted((root / "labeled" / "images").glob("*.jpg")):
        infection = np.asarray(Image.open(root / "labeled" / "masks" / f"{path.stem}.png").convert("L")) > 127
        masks = dict(zip(("lungs", "field"), _slice_masks(path)))
        for name, mask in masks.items():
            inside = int((mask & infection).sum())
            totals[name][0] += inside
            totals[name][1] += int(mask.sum())
            worst[name] = min(worst[name], inside / max(int(infection.sum()), 1))
        total_infection = int(infection.sum())
        totals.setdefault("infection", [0])[0] += total_infection
    seconds = time.perf_counter() - started
    n_inf = totals["infection"][0]
    return [
        "| COVID-SemiSeg labeled (50 slices) | lungs (classical) | field |",
        "|---|---|---|",
        f"| infection inside, pooled | {totals['lungs'][0] / n_inf:.4f} | {totals['field'][0] / n_inf:.4f} |",
        f"| infection inside, worst slice | {worst['lungs']:.4f} | {worst['field']:.4f} |",
        f"| area (pixels, all slices) | {totals['lungs'][1]} | {totals['field'][1]} ({totals['field'][1] / totals['lungs'][1]:.2f}x) |",
        f"\n(both masks for all 50 slices: {seconds:.1f} s)",
    ]


def unlabeled_rows(root: Path) -> list[str]:
    small, border, lung_share, field_share = 0, 0, [], []
    paths = sorted((root / "unlabeled" / "images").glob("*.jpg"))
    started = time.perf_counter()
    for path in paths:
        lungs, field = _slice_masks(path)
        edge = np.concatenate([field[0], field[-1], field[:, 0], field[:, -1]])
        small += int(lungs.mean() < 0.2)
        border += int(edge.mean() > 0.25)
        lung_share.append(float(lungs.mean()))
        field_share.append(float(field.mean()))
    return [
        f"| COVID-SemiSeg unlabeled ({len(paths)} slices) | value |",
        "|---|---|",
        f"| slices with lungs under 20 % of the slice | {small} |",
        f"| slices with a field over 25 % of the frame border | {border} |",
        f"| mean share of the slice: lungs, field | {np.mean(lung_share):.3f}, {np.mean(field_share):.3f} |",
        f"\n(both masks for all {len(paths)} slices: {time.perf_counter() - started:.1f} s)",
    ]


def phantom_rows(n: int, shape: tuple[int, int, int]) -> list[str]:
    from plsynth.data.image import CTImage
    from plsynth.data.lungs import lung_field, lung_mask
    from plsynth.data.phantom import make_phantom

    healthy, sick = [], []
    for seed in range(n):
        for lesions, rows in ((False, healthy), (True, sick)):
            p = make_phantom(seed, shape, lesions=lesions)
            image = CTImage(array=p.hu, kind="hu", spacing=p.spacing, source=Path(f"phantom-{seed}"))
            lungs = lung_mask(image)
            field = lung_field(image, lungs)
            truth, infection = p.lung > 0, p.infection > 0
            rows.append(((field > 0).sum() / max((lungs > 0).sum(), 1), dice(lungs > 0, truth), dice(field > 0, truth),
                         (infection & (lungs > 0)).sum() / max(infection.sum(), 1),
                         (infection & (field > 0)).sum() / max(infection.sum(), 1)))
    h, s = np.array(healthy), np.array(sick)
    return [
        f"| HU phantoms {shape[0]}x{shape[1]}x{shape[2]}, seeds 0..{n - 1} | lungs | field |",
        "|---|---|---|",
        f"| infection-free: area / lungs, mean (max) | 1.000 | {h[:, 0].mean():.3f} ({h[:, 0].max():.3f}) |",
        f"| infection-free: Dice vs truth, mean (min) | {h[:, 1].mean():.4f} ({h[:, 1].min():.4f}) | {h[:, 2].mean():.4f} ({h[:, 2].min():.4f}) |",
        f"| with lesions: Dice vs truth, mean | {s[:, 1].mean():.4f} | {s[:, 2].mean():.4f} |",
        f"| with lesions: infection inside, mean | {s[:, 3].mean():.3f} | {s[:, 4].mean():.3f} |",
    ]


def bundle_rows(bundle: Path, config: Path, root: Path, cache: Path) -> list[str]:
    from plsynth.config import load_config
    from plsynth.data.io import read_image
    from plsynth.data.lungs import lung_field
    from plsynth.deploy import postprocess as post
    from plsynth.deploy.predictor import Predictor
    from plsynth.training.evaluate import evaluate_bundle

    cfg = load_config(config, [f"data.root={root}", f"data.cache_dir={cache}"])
    with tempfile.TemporaryDirectory() as work:
        evaluated = evaluate_bundle(bundle, cfg, out=Path(work) / "eval")
    names = [row["case"] for row in evaluated["per_case"]]
    predictor = Predictor.from_bundle(bundle, engine="ort", agreement=False, threads=2)
    scores: dict[str, list[float]] = {"network alone (no clip)": [], "clipped to the lungs (before)": [],
                                      "clipped to the field (after, in process)": [], "plsynth-infer (after)": []}
    with tempfile.TemporaryDirectory() as work:
        inputs, out = Path(work) / "val", Path(work) / "out"
        inputs.mkdir()
        for name in names:
            (inputs / f"{name}.jpg").symlink_to(root / "labeled" / "images" / f"{name}.jpg")
        script = Path(sys.executable).parent / "plsynth-infer"
        subprocess.run([str(script), str(inputs), "-o", str(out), "--model", str(bundle), "--engine", "ort",
                        "--no-agreement", "--threads", "2"], check=True, capture_output=True)
        for name in names:
            label = np.asarray(Image.open(root / "labeled" / "masks" / f"{name}.png").convert("L")) > 127
            image = read_image(root / "labeled" / "images" / f"{name}.jpg")
            lungs = predictor.lung_fn(image)
            field = lung_field(image, lungs)
            prob = predictor.probabilities(image, field)
            raw = post.threshold(prob, predictor.bundle.threshold)
            small = post.min_voxels(predictor.min_size_mm3, None, predictor.min_size_px)
            scores["network alone (no clip)"].append(dice(raw[0], label))
            for row, region in (("clipped to the lungs (before)", lungs), ("clipped to the field (after, in process)", field)):
                scores[row].append(dice(post.remove_small_components(post.keep_inside_lungs(raw, region), small)[0], label))
            scores["plsynth-infer (after)"].append(dice(np.asarray(Image.open(out / f"{name}.png")) > 127, label))
    lines = [f"| bundle `{bundle}` on its {len(names)} validation slices, native size | mean per-image Dice |", "|---|---|"]
    lines += [f"| {k} | {np.mean(v):.4f} |" for k, v in scores.items()]
    lines.append(f"| `plsynth eval` ({cfg.data.image_size} px, clipped to the cached field) | {evaluated['dice']:.4f} |")
    return lines


def timing_rows(shape: tuple[int, int, int]) -> list[str]:
    from plsynth.data.image import CTImage
    from plsynth.data.lungs import lung_field, lung_mask
    from plsynth.data.phantom import make_phantom

    p = make_phantom(0, shape)
    image = CTImage(array=p.hu, kind="hu", spacing=p.spacing, source=Path("big"))
    started = time.perf_counter()
    lungs = lung_mask(image)
    t_lungs = time.perf_counter() - started
    started = time.perf_counter()
    lung_field(image, lungs)
    t_field = time.perf_counter() - started
    return [f"| {shape[0]}x{shape[1]}x{shape[2]} HU phantom | lungs {t_lungs:.1f} s | field +{t_field:.1f} s |"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--root", type=Path, required=True, help="COVID-SemiSeg folder")
    parser.add_argument("--bundle", type=Path, default=None)
    parser.add_argument("--config", type=Path, default=Path("configs/semiseg-cpu.yaml"), help="the bundle's training config")
    parser.add_argument("--cache", type=Path, default=Path("runs/cache"))
    parser.add_argument("--n", type=int, default=6)
    parser.add_argument("--shape", type=int, nargs=3, default=(48, 256, 256))
    parser.add_argument("--big", type=int, nargs=3, default=None)
    parser.add_argument("--unlabeled", action="store_true", help="also the 1600 unlabeled slices (~2 min)")
    parser.add_argument("--skip-phantoms", action="store_true")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results/lung_field.md")
    args = parser.parse_args()
    load = os.getloadavg()[0]
    lines = [f"# Lungs vs lung field ({datetime.date.today()}, {machine.cpu()}, "
             f"load average {load:.1f} at start)", "", "`" + " ".join(["python"] + sys.argv) + "`", ""]
    lines += semiseg_rows(args.root) + [""]
    if args.unlabeled:
        lines += unlabeled_rows(args.root) + [""]
    if not args.skip_phantoms:
        lines += phantom_rows(args.n, tuple(args.shape)) + [""]
    if args.bundle is not None:
        lines += bundle_rows(args.bundle, args.config, args.root, args.cache) + [""]
    if args.big is not None:
        lines += timing_rows(tuple(args.big)) + [""]
    text = "\n".join(lines)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
