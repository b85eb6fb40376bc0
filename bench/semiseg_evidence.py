"""Does the synthesizer draw what a map says, on maps it never saw? (COVID-SemiSeg, issue 11)

    python bench/semiseg_evidence.py --synth RUN/synthesizer/bundle --judge RUN/baseline-s0/bundle \
        --teacher RUN/baseline-s1/bundle --config configs/semiseg-cpu.yaml \
        --set data.root=DATA --set data.cache_dir=RUN/cache --run RUN/evidence \
        --out bench/results/semiseg_evidence.json --gallery bench/results/semiseg_gallery.png

Maps the synthesizer never saw (it is trained on the training split's labeled slices only):
  val     the validation slices' true maps (lung + infection);
  pseudo  pseudo-label maps of a fixed, evenly spaced subset of unlabeled slices (``--unlabeled``)
          from a fixed teacher (a segmenter trained on real labeled slices; infection kept in
          the lung, as SA-CPS / SA-ST do).
Each map is drawn ``--draws`` times (one pool draw per seed) as given, with the infection
removed, and with the infection moved (``synth_preview.move_infection``); the three variants of
one draw share the pool style. A fixed judge (a segmenter trained on real labeled slices only,
never on synthetic images) segments every image. Reported per map set, each next to the same
figure on the real slices the maps come from:
  dice        judge Dice vs the map's infection (maps with infection) | real: judge Dice vs the
              same map on the real slice (val: ground truth; pseudo: the teacher's label);
  free_lung   fraction of the lung the judge marks on the infection-removed image | real:
              fraction of the infection-free lung (lung minus the map's infection) it marks;
  moved_dice  judge Dice vs the moved infection | real: the dice reference above;
  kid         kernel inception distance (unbiased MMD^2, cubic polynomial kernel) between
              judge-encoder features of lung regions (per image: lung-masked mean of the
              judge's 2nd and 3rd down-sampling blocks) of the synthetic images (maps as
              given) and of the real *training* labeled slices | real: the same distance from
              the real slices of the set (val: validation slices; pseudo: unlabeled slices);
  grid        share of an image's power at >= 1/8 cycle per pixel that lies on the two frequency
              axes (mean over images): straight full-length rows and columns, a grid of lines or
              a frame along the border, put their power there; CT spreads it | real: the same
              share on the set's real slices; ``grid_inner``: the same on the image less a
              12-pixel border (the frame's part is the difference);
  texture     fine texture: mean |image - Gaussian blur (sigma 1 px)| over the lung, 2 px in from
              its border (x 1e3, image in [0, 1]); a region drawn flat scores near 0, vessels and
              reticulation score high | real: the same on the set's real slices; ``texture_inf``:
              the same over the map's infection only.
The gallery: one row per held-out map (val first): real | map | 3 pool draws | infection
removed | moved map | its image (maps as the synthesizer built them; with ``synth.vessels`` the
vessels, yellow, are read from the real slice the map belongs to, as in SA-CPS, except inside its
infection on the removed and moved maps, which get plain lung there:
``synth_preview.draw_variants``). Writes JSON (per image rows and summary) and prints Markdown.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np

import machine

REPO = Path(__file__).resolve().parents[1]


def _dice(pred: np.ndarray, ref: np.ndarray) -> float:
    from plsynth.metrics import dice

    return float(dice(pred.astype(bool), ref.astype(bool)))


def _frac(pred: np.ndarray, region: np.ndarray) -> float:
    n = int(region.sum())
    return float((pred.astype(bool) & region.astype(bool)).sum() / n) if n else float("nan")


def _mean(values) -> float:
    v = [x for x in values if not np.isnan(x)]
    return float(np.mean(v)) if v else float("nan")


def _sd(values) -> float:
    v = [x for x in values if not np.isnan(x)]
    return float(np.std(v, ddof=1)) if len(v) > 1 else float("nan")


def kid(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 with the cubic polynomial kernel (x.y / d + 1)^3 (KID, Binkowski et al. 2018)."""
    d = x.shape[1]
    kxx, kyy, kxy = ((a @ b.T / d + 1) ** 3 for a, b in ((x, x), (y, y), (x, y)))
    m, n = len(x), len(y)
    return float((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
                 - 2 * kxy.mean())


def grid_share(images: np.ndarray, cutoff: float = 1 / 8) -> float:
    """Mean share of the power at spatial frequency >= ``cutoff`` (cycles / pixel) on the fx = 0
    and fy = 0 axes of each image's 2-D spectrum (``grid`` in the module docstring)."""
    images = images.reshape(-1, *images.shape[-2:]).astype(np.float64)
    power = np.abs(np.fft.fft2(images - images.mean(axis=(1, 2), keepdims=True))) ** 2
    fy, fx = np.meshgrid(np.fft.fftfreq(images.shape[1]), np.fft.fftfreq(images.shape[2]), indexing="ij")
    high = np.hypot(fy, fx) >= cutoff
    axes = high & ((fy == 0) | (fx == 0))
    return float(np.mean(power[:, axes].sum(1) / power[:, high].sum(1)))


def fine_texture(images: np.ndarray, masks: np.ndarray, sigma: float = 1.0, inset: int = 2) -> float:
    """Mean over images of the mean |image - blur(image)| inside ``masks`` eroded by ``inset`` px
    (``texture`` in the module docstring); images whose eroded mask is empty are left out."""
    from scipy.ndimage import binary_erosion, gaussian_filter

    images = images.reshape(-1, *images.shape[-2:]).astype(np.float64)
    masks = masks.reshape(-1, *masks.shape[-2:]) > 0
    values = []
    for image, mask in zip(images, masks):
        inner = binary_erosion(mask, iterations=inset)
        if inner.any():
            values.append(float(np.abs(image - gaussian_filter(image, sigma))[inner].mean()))
    return float(np.mean(values)) if values else float("nan")


def lung_features(net, images: np.ndarray, lungs: np.ndarray, batch: int = 16) -> np.ndarray:
    """(N, F): per image, the lung-masked mean of the judge's 2nd and 3rd down-sampling blocks."""
    import torch
    import torch.nn.functional as F

    feats, taps = [], {}
    hooks = [net.downs[i].register_forward_hook(lambda m, a, out, i=i: taps.__setitem__(i, out)) for i in (1, 2)]
    net.eval()
    try:
        with torch.no_grad():
            for s in range(0, len(images), batch):
                x = torch.as_tensor(images[s:s + batch], dtype=torch.float32)
                mask = torch.as_tensor(lungs[s:s + batch] > 0, dtype=torch.float32)[:, None]
                net(x)
                parts = []
                for i in (1, 2):
                    f = taps[i]
                    m = F.interpolate(mask, size=f.shape[-2:], mode="area")
                    parts.append((f * m).sum((2, 3)) / m.sum((2, 3)).clamp(min=1e-6))
                feats.append(torch.cat(parts, 1).numpy())
    finally:
        for h in hooks:
            h.remove()
    return np.concatenate(feats).astype(np.float64)


def evaluate_maps(name, synth, judge, threshold, images, lungs, infections, draws, seed0):
    """Synthesize (as given / removed / moved) for every map and score with the judge."""
    from plsynth.training.evaluate import predict_slices
    from plsynth.training.synth_preview import draw_variants, move_infection

    real_pred = predict_slices(judge, images[:, None], threshold)
    infected = [i for i in range(len(lungs)) if infections[i].any()]
    real = {
        "slices": len(lungs), "infected": len(infected),
        "dice": _mean([_dice(real_pred[i], infections[i]) for i in infected]),
        "dice_sd": _sd([_dice(real_pred[i], infections[i]) for i in infected]),
        "free_lung": _mean([_frac(real_pred[i], (lungs[i] > 0) & (infections[i] == 0)) for i in range(len(lungs))]),
    }
    rows, given_images, given_lungs, given_infs, tiles = [], [], [], [], {}
    for i in range(len(lungs)):
        lung, inf = lungs[i], infections[i]
        for d in range(draws):
            seed = seed0 + 1000 * d + i
            moved = move_infection(inf, lung, np.random.default_rng(seed))
            maps, drawn = draw_variants(synth, np.stack([inf, np.zeros_like(inf), moved]), lung, images[i], seed)
            pa, pb, pc = predict_slices(judge, drawn[:, None], threshold)
            given_images.append(drawn[0])
            given_lungs.append(lung)
            given_infs.append(inf)
            tiles[(i, d)] = (drawn, moved, maps if d == 0 else None)  # the gallery shows draw 0's maps
            rows.append({
                "set": name, "map": i, "draw": d, "seed": seed, "infection_px": int(inf.sum()),
                "dice": _dice(pa, inf) if inf.any() else float("nan"),
                "free_lung": _frac(pb, lung > 0),
                "moved_dice": _dice(pc, moved) if moved.any() and inf.any() else float("nan"),
            })
    synthetic = {
        "images_per_variant": len(rows),
        "dice": _mean(r["dice"] for r in rows), "dice_sd": _sd([r["dice"] for r in rows]),
        "free_lung": _mean(r["free_lung"] for r in rows),
        "moved_dice": _mean(r["moved_dice"] for r in rows), "moved_dice_sd": _sd([r["moved_dice"] for r in rows]),
    }
    return real, synthetic, rows, np.stack(given_images)[:, None], np.stack(given_lungs), np.stack(given_infs), tiles


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--synth", type=Path, required=True, help="synthesizer bundle folder")
    parser.add_argument("--judge", type=Path, required=True, help="segmenter bundle trained on real labeled slices only")
    parser.add_argument("--teacher", type=Path, required=True, help="segmenter bundle that makes the pseudo-label maps")
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "semiseg-cpu.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="dotted override, repeatable")
    parser.add_argument("--run", type=Path, required=True, help="work folder (split info)")
    parser.add_argument("--draws", type=int, default=3, help="pool draws (seeds) per map")
    parser.add_argument("--k", type=int, default=None, help="style codes averaged per draw (default: the bundle's synth.pool_k)")
    parser.add_argument("--unlabeled", type=int, default=40, help="unlabeled slices (evenly spaced) for pseudo maps")
    parser.add_argument("--backend", default="ort", choices=["torch", "ort"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--label", default="", help="name of the synthesizer variant in the printed row")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "semiseg_evidence.json")
    parser.add_argument("--gallery", type=Path, default=None, help="PNG gallery of held-out maps")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    import torch

    from plsynth.config import load_config
    from plsynth.data.datasets import build_splits
    from plsynth.bundles.segmenter import load_bundle
    from plsynth.synth_service.local import LocalSynthesizer
    from plsynth.training.methods import pseudo_label

    torch.set_num_threads(args.threads)
    cfg = load_config(args.config, args.overrides)
    splits = build_splits(cfg, args.run)
    size = cfg.data.image_size
    judge_b, teacher_b = load_bundle(args.judge), load_bundle(args.teacher)
    for b, p in ((judge_b, args.judge), (teacher_b, args.teacher)):
        if b.image_size != size:
            raise ValueError(f"{p}: input size {b.image_size} != data.image_size {size}")
    judge, teacher = judge_b.torch_networks()["model"].eval(), teacher_b.torch_networks()["model"].eval()
    synth = LocalSynthesizer(args.synth, backend=args.backend, threads=args.threads, k=args.k)
    if synth.image_size != size:
        raise ValueError(f"synthesizer size {synth.image_size} != data.image_size {size}")

    # held-out maps (a): validation slices
    val_img = np.concatenate([np.asarray(c.image)[:, 0] for c in splits.val]).astype(np.float32)
    val_lung = np.concatenate([np.asarray(c.lung) for c in splits.val]).astype(np.uint8)
    val_inf = (np.concatenate([np.asarray(c.label) for c in splits.val]) > 0).astype(np.uint8)
    # held-out maps (b): the teacher's pseudo-labels of evenly spaced unlabeled slices
    un = splits.unlabeled
    pick = np.linspace(0, len(un) - 1, min(args.unlabeled, len(un))).round().astype(int)
    items = [un[int(i)] for i in pick]
    un_img = np.stack([np.asarray(it["image"])[0] for it in items]).astype(np.float32)
    un_lung = np.stack([np.asarray(it["lung"]) for it in items]).astype(np.uint8)
    with torch.no_grad():
        un_inf = pseudo_label(teacher(torch.from_numpy(un_img[:, None])), teacher_b.threshold,
                              torch.from_numpy(un_lung.astype(np.int64)))[:, 0].numpy().astype(np.uint8)
    # real training labeled slices: the reference distribution of the realism figure
    lab = splits.labeled
    tr_img = np.stack([np.asarray(lab[i]["image"])[0] for i in range(len(lab))]).astype(np.float32)
    tr_lung = np.stack([np.asarray(lab[i]["lung"]) for i in range(len(lab))]).astype(np.uint8)
    feat_train = lung_features(judge, tr_img[:, None], tr_lung)

    tic = time.perf_counter()
    summary, all_rows, tiles = {}, [], {}
    for name, img, lung, inf, seed0 in (("val", val_img, val_lung, val_inf, 0), ("pseudo", un_img, un_lung, un_inf, 500)):
        real, syn, rows, given, given_lung, given_inf, t = evaluate_maps(
            name, synth, judge, judge_b.threshold, img, lung, inf, args.draws, seed0)
        real["kid"] = kid(lung_features(judge, img[:, None], lung), feat_train)
        syn["kid"] = kid(lung_features(judge, given, given_lung), feat_train)
        real["grid"], syn["grid"] = grid_share(img), grid_share(given)
        real["grid_inner"], syn["grid_inner"] = grid_share(img[..., 12:-12, 12:-12]), grid_share(given[..., 12:-12, 12:-12])
        real["texture"], syn["texture"] = fine_texture(img, lung), fine_texture(given, given_lung)
        real["texture_inf"], syn["texture_inf"] = fine_texture(img, inf), fine_texture(given, given_inf)
        summary[name] = {"real": real, "synthetic": syn,
                         "infection_frac_of_lung": _mean([_frac(i, l > 0) for i, l in zip(inf, lung)])}
        all_rows += rows
        tiles[name] = (img, lung, inf, t)
    seconds = time.perf_counter() - tic

    if args.gallery is not None:
        from plsynth.training.synth_preview import colorize_map, gray_to_rgb, save_grid

        grid = []
        for name, n in (("val", 4), ("pseudo", 4)):
            img, lung, inf, t = tiles[name]
            order = sorted(range(len(lung)), key=lambda i: -int(inf[i].sum()))[:n]
            for i in order:
                draws = [t[(i, d)][0] for d in range(args.draws)]
                maps = t[(i, 0)][2]  # as the synthesizer built them: given, removed, moved
                grid.append([gray_to_rgb(img[i]), colorize_map(maps[0]),
                             *[gray_to_rgb(d[0]) for d in draws], gray_to_rgb(draws[0][1]),
                             colorize_map(maps[2]), gray_to_rgb(draws[0][2])])
        save_grid(grid, args.gallery)

    result = {
        "command": " ".join(sys.argv), "label": args.label,
        "synth": str(args.synth), "synth_sha256": synth.bundle_sha256, "synth_backend": synth.backend, "k": synth.k,
        "judge": str(args.judge), "teacher": str(args.teacher), "config": str(args.config),
        "overrides": args.overrides, "machine": machine.describe(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S"), "seconds": round(seconds, 1),
        "summary": summary, "rows": all_rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(markdown_row(args.label or str(args.synth), summary))
    return 0


HEADER = ("| synthesizer | maps | Dice drawn (real) | lung marked, no infection (real) | Dice moved | "
          "KID x1e3 (real) | grid %, whole / 12 px in (real) | texture x1e3, lung / infection (real) |\n"
          "|---|---|---|---|---|---|---|---|")


def markdown_row(label: str, summary: dict) -> str:
    """Two Markdown rows (val maps, pseudo maps) of HEADER's table."""
    lines = []
    for name in ("val", "pseudo"):
        r, s = summary[name]["real"], summary[name]["synthetic"]
        lines.append(
            f"| {label} | {name} (n={r['infected']}/{r['slices']}) | {s['dice']:.3f} +- {s['dice_sd']:.3f} ({r['dice']:.3f}) "
            f"| {s['free_lung']:.4f} ({r['free_lung']:.4f}) | {s['moved_dice']:.3f} | {1e3 * s['kid']:.1f} ({1e3 * r['kid']:.1f}) "
            f"| {100 * s['grid']:.1f} / {100 * s['grid_inner']:.1f} ({100 * r['grid']:.1f} / {100 * r['grid_inner']:.1f}) "
            f"| {1e3 * s['texture']:.1f} / {1e3 * s['texture_inf']:.1f} ({1e3 * r['texture']:.1f} / {1e3 * r['texture_inf']:.1f}) |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
