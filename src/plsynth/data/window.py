"""Intensity window: CT voxels to the network's input range [0, 1], and back.

The paper (Lyu et al., section IV-A) clips HU to [-1250, 250] and maps that range linearly
to [0, 255]; plsynth stores the same mapping as [0, 1] (float32), i.e. the paper's 8-bit value divided by 255.
2D slices that come already windowed to 8 bit (COVID-SemiSeg PNG/JPG) are divided by 255:
**their window is unknown** (the slices were exported by other people with windows we cannot
recover, and the labeled and unlabeled parts of COVID-SemiSeg were windowed differently), so
they cannot be put on the HU scale and a model trained on them sees a different intensity
scale than one trained on HU volumes.
"""

from __future__ import annotations

import numpy as np

from plsynth.config import PAPER_WINDOW_HU
from plsynth.data.image import CTImage
INTENSITIES = ("window", "calibrate")
# "calibrate": an 8-bit slice is put back on the HU window from two tissues every chest slice shows
REFERENCE_HU = (-850.0, 40.0)  # aerated lung parenchyma, soft tissue (muscle, blood)
GAIN_RANGE = (0.5, 3.0)  # a slice whose tissues would need more stretch than this is clamped to it
BLACK = 12.0 / 255.0  # below this an 8-bit pixel is air or export padding


def _check_window(window_hu: tuple[float, float]) -> tuple[float, float]:
    low, high = (float(value) for value in window_hu)
    if not (np.isfinite(low) and np.isfinite(high) and low < high):
        raise ValueError(f"window_hu must be finite (low, high) with low < high, got {tuple(window_hu)}")
    return low, high


def window_array(hu: np.ndarray, window_hu: tuple[float, float] = PAPER_WINDOW_HU) -> np.ndarray:
    """Clip HU values to ``window_hu = (low, high)`` and map them linearly to [0, 1] (float32).

    ``low`` maps to 0, ``high`` to 1; values outside are clipped. Any shape. NaN stays NaN
    (``plsynth.data.io.read_image`` never returns NaN). Inverse: :func:`unit_to_hu`
    (exact inside the window).
    """
    low, high = _check_window(window_hu)
    unit = np.array(hu, dtype=np.float32)  # one new array, then in place: volumes are large
    unit -= np.float32(low)
    unit /= np.float32(high - low)
    return np.clip(unit, 0.0, 1.0, out=unit)


def unit_to_hu(unit: np.ndarray, window_hu: tuple[float, float] = PAPER_WINDOW_HU) -> np.ndarray:
    """Inverse of :func:`window_array` on [0, 1]: ``low + unit * (high - low)`` in HU (float32).

    Used to put synthetic or windowed images back on the HU scale (e.g. for lungmask, which
    needs HU). Values clipped by the window are not recovered, of course.
    """
    low, high = _check_window(window_hu)
    unit = np.asarray(unit, dtype=np.float32)
    return (np.float32(low) + unit * np.float32(high - low)).astype(np.float32, copy=False)


def to_unit(image: CTImage, window_hu: tuple[float, float] = PAPER_WINDOW_HU, intensity: str = "window",
            lung: np.ndarray | None = None) -> np.ndarray:
    """The network input for ``image``: float32 array of ``image.array``'s shape, values in [0, 1].

    - ``kind == "hu"``: HU clipped to ``window_hu`` and mapped linearly (:func:`window_array`).
    - ``kind == "uint8"``: an 8-bit slice that was windowed before we got it; divided by 255
      (``intensity="window"``), or re-windowed from its own lung and soft tissue
      (``intensity="calibrate"``, :func:`calibrate_slices`, needs ``lung``).
    """
    if intensity not in INTENSITIES:
        raise ValueError(f"intensity must be one of {INTENSITIES}, got {intensity!r}")
    if image.kind == "hu":
        return window_array(image.array, window_hu)
    if image.kind == "uint8":
        _check_window(window_hu)
        unit = (np.asarray(image.array, dtype=np.float32) / np.float32(255.0)).clip(0.0, 1.0)
        if intensity == "calibrate":
            if lung is None:
                raise ValueError("intensity 'calibrate' needs the slice's lung labels")
            unit = calibrate_slices(unit, lung, window_hu)
        return unit
    raise ValueError(f"{image.source}: unknown CTImage kind {image.kind!r}; expected 'hu' or 'uint8'")


def calibrate_slices(unit: np.ndarray, lung: np.ndarray, window_hu: tuple[float, float] = PAPER_WINDOW_HU) -> np.ndarray:
    """8-bit slices of unknown window put on ``window_hu`` from two tissues each slice shows.

    Per slice: Otsu's split of the non-black pixels separates dark from bright; the median of the
    dark pixels inside ``lung`` is aerated lung, the median of the bright pixels outside it is soft
    tissue. The linear map that sends those two levels to ``REFERENCE_HU`` on ``window_hu`` undoes
    the unknown export window (gain clamped to ``GAIN_RANGE``). Why: COVID-SemiSeg's labeled and
    unlabeled slices were exported with different windows (mean grey 137 vs 85), which shifts a
    segmenter's pseudo-labels; a slice without both tissues is left as it is.
    """
    from skimage.filters import threshold_otsu

    lung_ref, tissue_ref = (float(v) for v in window_array(np.array(REFERENCE_HU), window_hu))
    out = np.array(unit, dtype=np.float32, copy=True)
    for z in range(out.shape[0]):
        grey, inside = out[z], np.asarray(lung[z]) > 0
        visible = grey[grey > BLACK]
        if visible.size < 16 or np.ptp(visible) == 0:
            continue
        split = float(threshold_otsu(visible))
        dark, bright = grey[inside & (grey < split)], grey[~inside & (grey > split)]
        if dark.size < 16 or bright.size < 16:
            continue
        lung_level, tissue_level = float(np.median(dark)), float(np.median(bright))
        gain = np.clip((tissue_ref - lung_ref) / max(tissue_level - lung_level, 1e-6), *GAIN_RANGE)
        out[z] = np.clip(lung_ref + (grey - lung_level) * gain, 0.0, 1.0)
    return out


__all__ = ["PAPER_WINDOW_HU", "INTENSITIES", "to_unit", "calibrate_slices", "unit_to_hu", "window_array"]
