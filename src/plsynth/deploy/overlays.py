"""QA overlay PNGs drawn without a display (matplotlib's Agg canvas, no pyplot, no X server).

One PNG per case: the axial slice with the most infection (or the middle slice) and, for
volumes, a coronal reformat through the infection's centre; lungs outlined in blue/green,
infection filled red. Intensities shown with the bundle's window.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from plsynth.atomic import atomic_write


def _panels(unit: np.ndarray, lung: np.ndarray, infection: np.ndarray) -> list[tuple[str, np.ndarray, np.ndarray, np.ndarray]]:
    per_slice = infection.reshape(infection.shape[0], -1).sum(1)
    z = int(per_slice.argmax()) if per_slice.any() else infection.shape[0] // 2
    panels = [(f"axial z={z}", unit[z], lung[z], infection[z])]
    if unit.shape[0] > 1:
        rows = infection.sum(axis=(0, 2))
        y = int(rows.argmax()) if rows.any() else unit.shape[1] // 2
        panels.append((f"coronal y={y}", unit[::-1, y, :], lung[::-1, y, :], infection[::-1, y, :]))
    return panels


def draw_overlay(path: Path, unit: np.ndarray, lung: np.ndarray, infection: np.ndarray, title: str) -> Path:
    """Write the overlay PNG for one case atomically. Arrays are (Z, Y, X); ``unit`` in [0, 1]."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = _panels(np.asarray(unit), np.asarray(lung), np.asarray(infection).astype(bool))
    fig = Figure(figsize=(4 * len(panels), 4.4), dpi=100)
    FigureCanvasAgg(fig)
    for i, (name, img, lab, inf) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        ax.imshow(img, cmap="gray", vmin=0, vmax=1, interpolation="nearest", aspect="auto")
        for label, color in ((1, "tab:blue"), (2, "tab:green")):
            if (lab == label).any():
                ax.contour(lab == label, levels=[0.5], colors=[color], linewidths=0.8)
        red = np.zeros((*inf.shape, 4), np.float32)
        red[inf] = (1.0, 0.0, 0.0, 0.45)
        ax.imshow(red, interpolation="nearest", aspect="auto")
        ax.set_title(name, fontsize=8)
        ax.axis("off")
    fig.suptitle(title, fontsize=9)
    with atomic_write(Path(path)) as tmp:
        fig.savefig(tmp, format="png")
    return Path(path)
