"""Classical lung back-end vs phantom truth: Dice over N phantoms and over the most lesion-heavy ones.

Usage: .venv/bin/python bench/lung_dice.py [--n 20] [--shape 48 256 256] [--big 300 512 512]
       [--out bench/results/lung_dice.md]

``--big Z Y X`` adds one timing (and Dice) line for a single deploy-size phantom (seed 0), with the
default half-resolution path for wide HU volumes and with ``downsample=False``.
``--half-res N`` compares both paths on N phantoms of 16x512x512 (seeds 0..N-1).
The load average (1 min) is recorded next to each timing: the machine is shared.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import time
from pathlib import Path

import numpy as np

import machine


# the figure of the per-slice implementation this bench replaced (kept as text: the old code is gone)
BEFORE = ("the per-slice loop over full slices (commit 85a8b9c and earlier) took 10.57 s per 48x256x256 volume "
          "with this command on 2026-11-28 under heavier load. Same-load comparisons (old code kept outside the "
          "repo, load average ~1-2): seed 11 at 48x256x256 old 2.0-2.6 s, new 0.42 s; slices 120-179 of the "
          "300x512x512 seed-0 phantom old 34.25 s, new at full resolution (downsample=False) 2.57 s (13x; Dice "
          "0.9955 old, 0.9956 new), i.e. ~170 s for the whole 300x512x512 volume before")


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum()))


def main() -> None:
    from plsynth.data.lungs import classical_lung_mask
    from plsynth.data.phantom import make_phantom

    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=20)
    parser.add_argument("--shape", type=int, nargs=3, default=(48, 256, 256))
    parser.add_argument("--heavy", type=int, default=5)
    parser.add_argument("--big", type=int, nargs=3, default=None, help="also time one phantom of this shape")
    parser.add_argument("--half-res", type=int, default=0, help="compare half/full resolution on N 16x512x512")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results/lung_dice.md")
    args = parser.parse_args()
    rows = []
    load_start = os.getloadavg()[0]
    for seed in range(args.n):
        start = time.perf_counter()
        p = make_phantom(seed, tuple(args.shape))
        made = time.perf_counter() - start
        start = time.perf_counter()
        mask = classical_lung_mask(p.hu, "hu", spacing=p.spacing)
        took = time.perf_counter() - start
        covered = np.logical_and(mask > 0, p.infection > 0).sum() / max(1, p.infection.sum())
        rows.append((seed, p.infection_fraction, dice(mask > 0, p.lung > 0), dice(mask == 1, p.lung == 1),
                     dice(mask == 2, p.lung == 2), covered if p.infection.any() else float("nan"), made, took))
    load_end = os.getloadavg()[0]
    big_lines = []
    if args.big is not None:
        start = time.perf_counter()
        p = make_phantom(0, tuple(args.big))
        made = time.perf_counter() - start
        big_lines = []
        for downsample in (True, False):
            load = os.getloadavg()[0]
            start = time.perf_counter()
            mask = classical_lung_mask(p.hu, "hu", spacing=p.spacing, downsample=downsample)
            took = time.perf_counter() - start
            big_lines.append(
                f"- One {'x'.join(map(str, args.big))} phantom (seed 0, spacing {p.spacing} mm), "
                f"{'half-resolution path (default)' if downsample else 'downsample=False'}: classical mask "
                f"{took:.2f} s (load average {load:.2f} -> {os.getloadavg()[0]:.2f}), Dice lungs "
                f"{dice(mask > 0, p.lung > 0):.4f}, left {dice(mask == 1, p.lung == 1):.4f}, right "
                f"{dice(mask == 2, p.lung == 2):.4f}; phantom generation {made:.1f} s")
        del p, mask
    half_lines = []
    if args.half_res:
        stats = {True: [], False: []}
        for seed in range(args.half_res):
            p = make_phantom(seed, (16, 512, 512))
            for downsample in (True, False):
                start = time.perf_counter()
                mask = classical_lung_mask(p.hu, "hu", spacing=p.spacing, downsample=downsample)
                took = time.perf_counter() - start
                inside = np.logical_and(mask > 0, p.infection > 0).sum()
                cov = inside / p.infection.sum() if p.infection.any() else np.nan
                stats[downsample].append((dice(mask > 0, p.lung > 0), cov, took))
        for downsample, name in ((True, "half resolution (default)"), (False, "downsample=False")):
            a = np.array(stats[downsample])
            half_lines.append(f"- {args.half_res} phantoms 16x512x512 (seeds 0..{args.half_res - 1}), {name}: "
                              f"Dice lungs mean {a[:, 0].mean():.4f}, min {a[:, 0].min():.4f}; infection inside mask mean "
                              f"{np.nanmean(a[:, 1]):.3f}; mask {a[:, 2].mean():.2f} s per volume")
    heavy = sorted(rows, key=lambda r: r[1], reverse=True)[: args.heavy]

    def summary(sel):
        d = np.array([r[2] for r in sel])
        return f"mean {d.mean():.4f}, min {d.min():.4f} (n={len(sel)})"

    lines = [
        "# Classical lung back-end vs phantom truth",
        "",
        f"Command: `.venv/bin/python bench/lung_dice.py --n {args.n} --shape {' '.join(map(str, args.shape))}"
        + (f" --big {' '.join(map(str, args.big))}" if args.big else "")
        + (f" --half-res {args.half_res}" if args.half_res else "") + "`  ",
        f"Machine: {platform.node()} ({machine.describe()}, shared with other jobs)  \nDate: {datetime.date.today().isoformat()}",
        "",
        f"- All {args.n} phantoms (seeds 0..{args.n - 1}): Dice (both lungs) {summary(rows)}",
        f"- {args.heavy} most lesion-heavy (largest infected share of lung): Dice {summary(heavy)}",
        f"- Time per volume: classical mask {np.mean([r[7] for r in rows]):.2f} s, phantom generation "
        f"{np.mean([r[6] for r in rows]):.2f} s (mean); load average (1 min) {load_start:.2f} at the start, "
        f"{load_end:.2f} at the end",
        *big_lines,
        *half_lines,
        *([f"- Before: {BEFORE}"] if BEFORE else []),
        "",
        "| seed | infected % of lung | Dice lungs | Dice left (1) | Dice right (2) | infection inside mask | mask s |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r[0]} | {100 * r[1]:.1f} | {r[2]:.4f} | {r[3]:.4f} | {r[4]:.4f} | {r[5]:.3f} | {r[7]:.2f} |")
    lines += ["", "Known misses: subpleural consolidation that forms a convex cap beyond the remaining lung's convex "
              "hull (the hull chord cuts it off), and slices whose lung is entirely consolidated."]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines[:9]))


if __name__ == "__main__":
    main()
