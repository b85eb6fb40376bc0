"""Does the synthesizer draw infection where the map says, and only there? (COVID-SemiSeg, issue 3 (b))

    python bench/semiseg_evidence.py --synth /work/runs-semiseg/synthesizer/bundle \
        --segmenter /work/runs-semiseg/baseline/bundle --config configs/semiseg-cpu.yaml \
        --set data.cache_dir=/work/runs-semiseg/cache --out bench/results/semiseg_evidence.json

For every *training-split* labeled slice with infection (never a validation slice: the
synthesizer was trained on the training split only, and so was the segmenter), the synthesizer
(``LocalSynthesizer``, pool style) draws three images from
  (a) the true map (lung + infection),
  (b) the same map with the infection removed,
  (c) the map with the infection moved elsewhere in the lungs (``synth_preview.move_infection``),
in one request (so with one pool draw, i.e. the same reference style, for the three; the
decoder's noise differs per image), ``--draws`` times per slice with different seeds. A segmenter trained on real labeled slices only (the baseline) is applied to
each image, and we report
  (a) Dice of its prediction vs the map's infection, next to its Dice on the real validation
      slices (and on the real training slices it was trained on, an upper reference);
  (b) the fraction of lung pixels it marks as infection (should be near zero), next to the
      same fraction on the real infection-free lung (lung minus the true infection) of the
      validation and training slices;
  (c) Dice vs the moved infection, and the fraction of the *old* infection (the part not
      covered by the moved one) that it still marks.
Per-slice Dice is averaged over slices (metrics' empty conventions; the maps here are never
empty in (a) and (c)). Writes JSON (per draw and summary) and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def _dice(pred: np.ndarray, ref: np.ndarray) -> float:
    from plsynth.metrics import dice

    return float(dice(pred.astype(bool), ref.astype(bool)))


def _frac(pred: np.ndarray, region: np.ndarray) -> float:
    n = int(region.sum())
    return float((pred.astype(bool) & region.astype(bool)).sum() / n) if n else float("nan")


def _mean(values: list[float]) -> float:
    v = [x for x in values if not np.isnan(x)]
    return float(np.mean(v)) if v else float("nan")


def _sd(values: list[float]) -> float:
    v = [x for x in values if not np.isnan(x)]
    return float(np.std(v, ddof=1)) if len(v) > 1 else float("nan")


def _pooled_frac(preds: list[np.ndarray], regions: list[np.ndarray]) -> float:
    num = sum(int((p.astype(bool) & r.astype(bool)).sum()) for p, r in zip(preds, regions))
    den = sum(int(r.sum()) for r in regions)
    return num / den if den else float("nan")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--synth", type=Path, required=True, help="synthesizer bundle folder")
    parser.add_argument("--segmenter", type=Path, required=True, help="segmenter bundle (trained on real labeled slices)")
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "semiseg-cpu.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="dotted override, repeatable")
    parser.add_argument("--run", type=Path, default=Path("/work/runs-semiseg/evidence"), help="work folder (data info)")
    parser.add_argument("--draws", type=int, default=2, help="pool draws (seeds) per slice")
    parser.add_argument("--backend", default="ort", choices=["torch", "ort"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=5, help="decoder timing repetitions at batch 8 (0: skip)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "semiseg_evidence.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    import torch

    from plsynth.config import load_config
    from plsynth.data.datasets import build_splits
    from plsynth.deploy.bundle import load_bundle
    from plsynth.synth_service.local import LocalSynthesizer
    from plsynth.training.evaluate import predict_slices
    from plsynth.training.synth_preview import move_infection

    torch.set_num_threads(args.threads)
    cfg = load_config(args.config, args.overrides)
    splits = build_splits(cfg, args.run)
    seg = load_bundle(args.segmenter)
    if seg.image_size != cfg.data.image_size:
        raise ValueError(f"{args.segmenter}: input size {seg.image_size} != data.image_size {cfg.data.image_size}")
    net = seg.torch_networks()["model"]
    synth = LocalSynthesizer(args.synth, backend=args.backend, threads=args.threads)
    size = cfg.data.image_size
    if synth.image_size != size:
        raise ValueError(f"synthesizer size {synth.image_size} != data.image_size {size}")

    # -- decoder throughput at this preset (batch 8, pool style, median of --reps) ----------
    throughput = None
    if args.reps > 0:
        from plsynth.data.semantic import one_hot, semantic_map

        b = 8
        lung_b = torch.from_numpy(np.stack([np.asarray(splits.labeled[i % len(splits.labeled)]["lung"]) for i in range(b)]).astype(np.int64))
        inf_b = torch.zeros(b, size, size)
        onehot = one_hot(semantic_map(lung_b, inf_b))
        style = synth.reference_style(b)
        synth.decode(onehot, style, noise_seed=0)  # warm-up
        times = []
        for r in range(args.reps):
            t0 = time.perf_counter()
            synth.decode(onehot, style, noise_seed=r)
            times.append(time.perf_counter() - t0)
        ms = 1000 * float(np.median(times))
        throughput = {"batch": b, "ms_per_batch_median": round(ms, 1), "slices_per_s": round(b / (ms / 1000), 2),
                      "reps": args.reps, "backend": synth.backend, "threads": args.threads}
        log_line = f"decoder {synth.backend}: {ms:.0f} ms per batch of {b} ({b / (ms / 1000):.2f} slices/s)"
        logging.info(log_line)

    # -- real references ------------------------------------------------------------------
    def real_scores(images, lungs, labels):
        preds = predict_slices(net, images, seg.threshold)
        dices = [_dice(p, l) for p, l in zip(preds, labels)]
        free = [(lg > 0) & (l == 0) for lg, l in zip(lungs, labels)]
        return {
            "slices": len(preds),
            "dice_mean": _mean(dices),
            "dice_sd": _sd(dices),
            "dice_mean_infected_only": _mean([d for d, l in zip(dices, labels) if l.any()]),
            "fp_frac_free_lung_mean": _mean([_frac(p, f) for p, f in zip(preds, free)]),
            "fp_frac_free_lung_pooled": _pooled_frac(list(preds), free),
        }

    val_img = np.concatenate([np.asarray(c.image) for c in splits.val])
    val_lung = np.concatenate([np.asarray(c.lung) for c in splits.val])
    val_lab = np.concatenate([np.asarray(c.label) for c in splits.val])
    real_val = real_scores(val_img, val_lung, val_lab)
    lab = splits.labeled
    tr_items = [lab[i] for i in range(len(lab))]
    tr_img = np.stack([np.asarray(it["image"]) for it in tr_items])
    tr_lung = np.stack([np.asarray(it["lung"]).astype(np.uint8) for it in tr_items])
    tr_lab = np.stack([(np.asarray(it["label"])[0] > 0.5).astype(np.uint8) for it in tr_items])
    real_train = real_scores(tr_img, tr_lung, tr_lab)

    # -- synthetic ------------------------------------------------------------------------
    infected = [i for i in range(len(tr_items)) if tr_lab[i].any()]
    rows = []
    preds_b, lungs_b = [], []
    tic = time.perf_counter()
    n_images = 0
    for j, i in enumerate(infected):
        lung, inf = tr_lung[i], tr_lab[i]
        for d in range(args.draws):
            seed = 1000 * d + j
            moved = move_infection(inf, lung, np.random.default_rng(seed))
            variants = [inf, np.zeros_like(inf), moved]
            infection = torch.from_numpy(np.stack(variants)[:, None].astype(np.float32))
            lungs = torch.from_numpy(np.stack([lung] * 3).astype(np.int64))
            # One request for the three maps: one pool draw (style) shared by them (noise is per image).
            images = synth.synthesize(infection, lungs, seed=seed)
            n_images += 3
            pa, pb, pc = predict_slices(net, images.numpy(), seg.threshold)
            lung_mask = lung > 0
            old_only = inf.astype(bool) & ~moved.astype(bool)
            rows.append({
                "slice": tr_items[i]["case"], "seed": seed,
                "infection_px": int(inf.sum()), "lung_px": int(lung_mask.sum()), "moved_px": int(moved.sum()),
                "a_dice": _dice(pa, inf),
                "a_pred_frac_lung": _frac(pa, lung_mask),
                "b_pred_frac_lung": _frac(pb, lung_mask),
                "c_dice_moved": _dice(pc, moved),
                "c_frac_old_marked": _frac(pc, old_only),
                "c_frac_old_marked_in_a": _frac(pa, old_only),
                "old_only_px": int(old_only.sum()),
            })
            preds_b.append(pb)
            lungs_b.append(lung_mask)
    seconds = time.perf_counter() - tic

    def col(name):
        return [r[name] for r in rows]

    summary = {
        "synthetic": {
            "slices": len(infected), "draws_per_slice": args.draws, "images": n_images,
            "seconds_synthesis_and_segmentation": round(seconds, 1),
            "a_dice_mean": _mean(col("a_dice")), "a_dice_sd": _sd(col("a_dice")),
            "b_pred_frac_lung_mean": _mean(col("b_pred_frac_lung")),
            "b_pred_frac_lung_pooled": _pooled_frac(preds_b, lungs_b),
            "b_slices_with_any_pred": int(sum(r["b_pred_frac_lung"] > 0 for r in rows)),
            "c_dice_moved_mean": _mean(col("c_dice_moved")), "c_dice_moved_sd": _sd(col("c_dice_moved")),
            "c_frac_old_marked_mean": _mean(col("c_frac_old_marked")),
            "c_frac_old_marked_in_a_mean": _mean(col("c_frac_old_marked_in_a")),
        },
        "decoder_throughput": throughput,
        "real_val": real_val,
        "real_train": real_train,
        "true_infection_frac_of_lung_train_infected": _mean(
            [_frac(tr_lab[i], tr_lung[i] > 0) for i in infected]
        ),
    }
    result = {
        "command": " ".join(sys.argv),
        "synth": str(args.synth), "synth_sha256": synth.bundle_sha256, "synth_backend": synth.backend,
        "segmenter": str(args.segmenter), "config": str(args.config), "overrides": args.overrides,
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "summary": summary, "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    s, v, t = summary["synthetic"], real_val, real_train
    print("\n".join([
        "| quantity | synthetic (training-split maps) | real validation | real training |",
        "|---|---|---|---|",
        f"| Dice vs infection, (a) true map | {s['a_dice_mean']:.3f} +- {s['a_dice_sd']:.3f} (n={len(rows)}) "
        f"| {v['dice_mean']:.3f} +- {v['dice_sd']:.3f} (n={v['slices']}; infected only {v['dice_mean_infected_only']:.3f}) "
        f"| {t['dice_mean']:.3f} (n={t['slices']}) |",
        f"| lung marked as infection, (b) infection removed / real infection-free lung "
        f"| {s['b_pred_frac_lung_mean']:.4f} (pooled {s['b_pred_frac_lung_pooled']:.4f}; {s['b_slices_with_any_pred']}/{len(rows)} images with any) "
        f"| {v['fp_frac_free_lung_mean']:.4f} (pooled {v['fp_frac_free_lung_pooled']:.4f}) "
        f"| {t['fp_frac_free_lung_mean']:.4f} (pooled {t['fp_frac_free_lung_pooled']:.4f}) |",
        f"| (c) Dice vs moved infection | {s['c_dice_moved_mean']:.3f} +- {s['c_dice_moved_sd']:.3f} | | |",
        f"| (c) fraction of the old place (old minus moved) still marked; same region in (a) "
        f"| {s['c_frac_old_marked_mean']:.3f}; {s['c_frac_old_marked_in_a_mean']:.3f} | | |",
    ]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
