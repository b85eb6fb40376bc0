"""docs/lungs-semiseg.png: the classical lung back-end on real COVID-SemiSeg slices.

12 slices (6 labeled with their infection outline in yellow, 6 unlabeled from different volumes);
patient-left lung (label 1) in blue, patient-right (label 2) in red. Needs COVID-SemiSeg.

Usage: .venv/bin/python bench/lung_grid.py [--root DIR (default $PLSYNTH_DATA/covid-semiseg)] [--out docs/lungs-semiseg.png]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np


def main() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    from plsynth.data.image import CTImage
    from plsynth.data.layouts import dataset_root
    from plsynth.data.lungs import lung_mask

    parser = argparse.ArgumentParser()
    parser.add_argument("--root", type=Path, default=None, help="COVID-SemiSeg folder (default $PLSYNTH_DATA/covid-semiseg)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "docs/lungs-semiseg.png")
    args = parser.parse_args()
    args.root = dataset_root("semiseg", args.root or "")
    labeled = sorted((args.root / "labeled/images").glob("*.jpg"))
    unlabeled = sorted((args.root / "unlabeled/images").glob("*.jpg"))
    picks = [(p, args.root / "labeled/masks" / f"{p.stem}.png") for p in labeled[:: max(1, len(labeled) // 6)][:6]]
    picks += [(p, None) for p in unlabeled[37 :: max(1, len(unlabeled) // 6)][:6]]
    fig, axes = plt.subplots(3, 4, figsize=(16, 12))
    for ax, (path, mask_path) in zip(axes.flat, picks):
        grey = np.asarray(Image.open(path).convert("L"), dtype=np.float32)
        lungs = lung_mask(CTImage(array=grey[None], kind="uint8", spacing=None, source=path))[0]
        overlay = np.zeros(grey.shape + (4,))
        overlay[lungs == 1] = (0.2, 0.4, 1.0, 0.35)
        overlay[lungs == 2] = (1.0, 0.2, 0.2, 0.35)
        ax.imshow(grey, cmap="gray", vmin=0, vmax=255)
        ax.imshow(overlay)
        if mask_path is not None and mask_path.exists():
            infection = np.asarray(Image.open(mask_path).convert("L")) > 127
            if infection.shape == grey.shape and infection.any():
                ax.contour(infection, [0.5], colors="yellow", linewidths=0.8)
        ax.set_title(f"{'labeled' if mask_path else 'unlabeled'} {path.name} ({grey.shape[1]}x{grey.shape[0]})", fontsize=9)
        ax.axis("off")
    fig.suptitle("Classical lung back-end on COVID-SemiSeg slices: blue = patient left (label 1), red = patient "
                 "right (label 2), yellow = expert infection outline", fontsize=11)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=60)


if __name__ == "__main__":
    main()
