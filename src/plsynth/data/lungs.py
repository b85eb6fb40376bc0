"""Lung masks behind one interface: the lungmask network, or a classical back-end needing no weights.

Output contract (project-wide): uint8 (z, y, x), 0 background, 1 patient-LEFT lung (larger x in
the LPS array, image right in a radiological-view slice), 2 patient-RIGHT lung. Neither
back-end reliably includes lung that holds no air (dense consolidation), so infection is clipped
to :func:`lung_field`, the lungs grown into the dense lung around them, everywhere (training
pseudo-labels, evaluation, plsynth-infer).

Back-ends:

- ``"lungmask"`` (:mod:`plsynth.data.lungmask_backend`): JoHof/lungmask R231 or R231CovidWeb
  from a local weights file or the torch hub cache, never downloaded; HU volumes only.
- ``"classical"`` (:func:`classical_lung_mask`): threshold, removal of outside air, largest
  components, hole filling and pleural concavity filling (so dense infection stays inside),
  airway removal and a left/right split. Works on HU volumes and on 8-bit slices such as
  COVID-SemiSeg's. Measured Dice against phantom truth: ``bench/results/lung_dice.md``.

:func:`default_lung_backend` says which one a CLI should use by default (lungmask when its
weights are present, else classical).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from scipy import ndimage

from plsynth.config import PAPER_WINDOW_HU
from plsynth.data.image import CTImage

logger = logging.getLogger(__name__)

LUNG_BACKENDS = ("classical", "lungmask")
# How lungs are grown into the lung field that clips infection (:func:`lung_field`); recorded in
# slice-cache keys and bundles. Bump when its masks change.
FIELD_ALGORITHM = "field-1"
HU_THRESHOLD = -400.0  # aerated lung (-900..-700) and GGO (-650..-350) below, soft tissue (0..+60) above
ASSUMED_FOV_MM = 350.0  # 8-bit slices carry no spacing: assume a chest field of view over the width
UINT8_AIR = 12.0  # 8-bit grey below this is air or export padding (black), or lung on the darkest windows
VESSEL_HOLES = 1.0  # per 1000 px: an edge-touching dark 8-bit region enclosing this many vessels is lung
VESSEL_CONTRAST = 5.0  # grey levels above the air threshold a hole must reach to count as a vessel
UINT8_BLACK = 6.0  # export padding and outside air on the darkest windows; lung there is grey 11-15
DOWNSAMPLE_FROM = 384  # HU volumes this wide (in-plane, pixels) or wider are labelled at half resolution
CLOSING_MM = 4.0  # smooths vessel notches at the pleura
# lung field (:func:`lung_field`): the thoracic cavity's lung regions, aerated or not
FIELD_GREY_HU = PAPER_WINDOW_HU  # HU volumes are judged on the paper's lung window mapped to 0..255
FIELD_SOLID_STD = 6.0  # grey levels: local s.d. below this (and brighter than lung) is solid organ, not lung
FIELD_BONE = 250.0  # grey level of bone (saturated on a lung window): not tissue, not lung
FIELD_WINDOW = 0.03  # local-statistics window, as a fraction of the slice width
CAVITY_FRACTION = 0.8  # inner chest wall: this fraction of the outermost aerated lung's depth in the body
SLICE_THREADS = min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
# ^ per-slice work runs on this many threads (ndimage releases the GIL); the CPUs this process may use
IN_PLANE = np.array([[[0, 0, 0], [0, 0, 0], [0, 0, 0]],
                     [[0, 1, 0], [1, 1, 1], [0, 1, 0]],
                     [[0, 0, 0], [0, 0, 0], [0, 0, 0]]], dtype=bool)  # 2D 4-connectivity, no z links


def lung_mask(image: CTImage, backend: str = "classical", *, lungmask_model: str = "R231",
              lungmask_weights: str | None = None, force_cpu: bool = True) -> np.ndarray:
    """Lung labels for ``image``: uint8 (z, y, x), 0 background, 1 patient-left, 2 patient-right.

    ``backend``: ``"classical"`` (no weights; HU volumes and 8-bit slices) or ``"lungmask"`` (HU
    only; ``lungmask_weights`` is a local .pth, None looks in the torch hub cache; raises
    FileNotFoundError naming the path to put the file in when it is missing).
    """
    if backend == "classical":
        return classical_lung_mask(image.array, image.kind, spacing=image.spacing)
    if backend == "lungmask":
        from plsynth.data.lungmask_backend import lungmask_lung_mask

        return lungmask_lung_mask(image, model=lungmask_model, weights=lungmask_weights, force_cpu=force_cpu)
    raise ValueError(f"unknown lung backend {backend!r}; choose one of {', '.join(LUNG_BACKENDS)}")


def lung_record(backend: str, lungmask_model: str = "R231") -> dict:
    """What a bundle or a cache records about its lung masks, so inference can use the same ones."""
    record = {"backend": backend, "field": FIELD_ALGORITHM}
    if backend == "lungmask":
        record["lungmask_model"] = lungmask_model
    return record


def lung_field(image: CTImage, lungs: np.ndarray) -> np.ndarray:
    """The region infection may occupy: ``lungs`` (0/1/2) grown into the dense lung around them.

    Any lung back-end misses lung that holds no air: the classical one thresholds air, and
    lungmask R231 was trained mostly on healthy lungs. Dense consolidation is the most diseased
    lung, so the infection clip (training pseudo-labels, evaluation, plsynth-infer) uses this
    field, not the lungs; the reported lung is the lungs plus the infection found in the field.
    HU volumes of ``DOWNSAMPLE_FROM`` pixels or more are grown on a 2x2 block-mean grid.
    Returns uint8 (z, y, x) 0/1/2, a superset of ``lungs``.
    """
    lungs = np.asarray(lungs, dtype=np.uint8)
    zs = np.nonzero(lungs.any(axis=(1, 2)))[0]
    field = lungs.copy()
    if zs.size == 0:
        return field
    hu = image.kind == "hu"
    ny, nx = lungs.shape[1:]
    factor = 2 if hu and min(ny, nx) >= DOWNSAMPLE_FROM else 1
    ny, nx = ny - ny % factor, nx - nx % factor
    array = np.empty((len(zs), ny // factor, nx // factor), np.float32)
    for i in range(0, len(zs), 32):  # in slabs: no full-size float copy of the volume
        array[i : i + 32] = _block_mean(image.array[zs[i : i + 32], :ny, :nx], factor)
    cand, smoothed = _candidate(array, image.kind)
    del array
    body = ~_outside_air(cand, smoothed, image.kind)
    may_rotate = _may_rotate(image.kind, image.array.shape[0])
    scale = 255.0 / np.ptp(FIELD_GREY_HU)

    def grow(i: int) -> None:  # slice zs[i], on its own: no volume-sized temporaries
        z = zs[i]
        grey = np.clip((smoothed[i] - FIELD_GREY_HU[0]) * scale, 0, 255) if hu else smoothed[i]
        grown = _slice_field(lungs[z, :ny:factor, :nx:factor], body[i], grey, may_rotate, hu)
        if factor > 1:
            grown = np.repeat(np.repeat(grown, factor, axis=0), factor, axis=1)
            grown = np.pad(grown, ((0, lungs.shape[1] - ny), (0, lungs.shape[2] - nx)))
        field[z] = np.where(lungs[z] > 0, lungs[z], grown)

    _per_slice(grow, len(zs))
    return field


def inside_lungs(mask: np.ndarray, lung: np.ndarray) -> np.ndarray:
    """Infection only where a lung label (1 or 2) is: the one clip of evaluation and inference."""
    return (np.asarray(mask).astype(bool) & (np.asarray(lung) > 0)).astype(np.uint8)


def available_lung_backends(lungmask_model: str = "R231", lungmask_weights: str | None = None) -> list[str]:
    """Back-ends usable here without a download: always ``classical``, ``lungmask`` when its weights exist."""
    from plsynth.data.lungmask_backend import lungmask_weights_present

    backends = ["classical"]
    if lungmask_weights_present(lungmask_model, lungmask_weights):
        backends.append("lungmask")
    return backends


def default_lung_backend(lungmask_model: str = "R231", lungmask_weights: str | None = None) -> str:
    """``"lungmask"`` when its weights are present (local file or torch hub cache), else ``"classical"``."""
    return "lungmask" if "lungmask" in available_lung_backends(lungmask_model, lungmask_weights) else "classical"


def default_lungmask_model() -> str:
    """R231CovidWeb when its weights are in the torch hub cache (it was trained with COVID-19
    lesions inside the lungs), else R231."""
    from plsynth.data.lungmask_backend import lungmask_weights_present

    return "R231CovidWeb" if lungmask_weights_present("R231CovidWeb") else "R231"


# ---------------------------------------------------------------------------------------------
# classical back-end


def _disk(radius: int) -> np.ndarray:
    r = max(1, int(radius))
    yy, xx = np.mgrid[-r:r + 1, -r:r + 1]
    return (yy**2 + xx**2) <= r * r


def _otsu(values: np.ndarray) -> float:
    from skimage.filters import threshold_otsu

    return float(threshold_otsu(values))


def _candidate(array: np.ndarray, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """(dark-voxel candidate mask, smoothed intensities) before any shape reasoning."""
    smoothed = ndimage.gaussian_filter(array.astype(np.float32, copy=False), sigma=(0.0, 1.0, 1.0))
    if kind == "hu":
        return smoothed < HU_THRESHOLD, smoothed
    # 8-bit slices come with unknown windows (COVID-SemiSeg: two hospitals, mean grey 137 vs 85):
    # threshold each slice at Otsu's split between dark (lung) and bright (tissue, bone), computed
    # over the pixels that are not black (outside air / export padding would pull the split down).
    cand = np.zeros(array.shape, dtype=bool)
    for z in range(array.shape[0]):
        values = smoothed[z][smoothed[z] > UINT8_AIR]
        if values.size > 16 and np.ptp(values) > 0:
            cand[z] = smoothed[z] < _otsu(values)
    return cand, smoothed


def _touching_edge(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(components of ``mask`` touching a slice edge, in-plane labels, per-label touching flags):
    one 3D labelling with a structure that does not link slices, a lookup table for the edge."""
    labels, count = ndimage.label(mask, structure=IN_PLANE)
    border = np.concatenate([labels[:, 0, :].ravel(), labels[:, -1, :].ravel(),
                             labels[:, :, 0].ravel(), labels[:, :, -1].ravel()])
    touching = np.zeros(count + 1, dtype=bool)
    touching[border] = True
    touching[0] = False
    return touching[labels], labels, touching


def _outside_air(cand: np.ndarray, smoothed: np.ndarray, kind: str) -> np.ndarray:
    """Air outside the patient: dark regions touching the slice edge (in-plane, per slice).

    For 8-bit slices only near-black regions count: COVID-SemiSeg slices are cropped to the chest,
    so the lungs themselves often touch the image edge and must not be removed with the air; on
    the darkest windows (some unlabeled slices: aerated lung at grey 11-15) such lungs are as dark
    as the air, so an edge-touching 8-bit region that encloses vessels is lung (:func:`_encloses_vessels`)
    and only its black part (below ``UINT8_BLACK``, export padding beside it) is outside.
    """
    if kind == "hu":
        air = cand
    else:  # black, or within 10 grey levels of the slice's darkest (windows that do not map air to 0)
        darkest = np.percentile(smoothed.reshape(smoothed.shape[0], -1), 0.5, axis=1).reshape(-1, 1, 1)
        threshold = np.maximum(UINT8_AIR, darkest + 10.0)
        air = smoothed < threshold
    outside, labels, touching = _touching_edge(air)
    if kind != "hu":  # lung as dark as the air: keep it, remove only its black (padding) part
        lung = _encloses_vessels(labels, touching, smoothed, threshold.ravel())
        if lung.any():
            outside = (touching & ~lung)[labels] | _touching_edge(lung[labels] & (smoothed < UINT8_BLACK))[0]
    del labels
    if kind != "hu":  # grow into the dark-but-not-black rim around the black air
        outside = ndimage.binary_dilation(outside, structure=IN_PLANE, iterations=2) & cand | outside
    return outside


def _encloses_vessels(labels: np.ndarray, candidates: np.ndarray, smoothed: np.ndarray,
                      threshold: np.ndarray) -> np.ndarray:
    """Per label of ``labels`` (in-plane components of ``smoothed < threshold``): whether it is
    one of ``candidates`` and encloses at least ``VESSEL_HOLES`` vessels per 1000 px: holes of 2 px
    to 1 % of the slice that rise ``VESSEL_CONTRAST`` grey levels above the threshold.

    Outside air is flat (noise leaves holes barely above the threshold); aerated lung is crossed
    by vessels. Measured on COVID-SemiSeg unlabeled slices whose lungs touch the crop edge: 3.7-6.3
    per 1000 px for the lungs, 0 for outside air and export padding; 0 for phantom air with noise.
    """
    result = np.zeros(candidates.shape, dtype=bool)
    max_hole = 0.01 * labels.shape[1] * labels.shape[2]
    for index, box in enumerate(ndimage.find_objects(labels), start=1):
        if box is None or not candidates[index]:
            continue
        region = labels[box] == index
        holes, n_holes = ndimage.label(ndimage.binary_fill_holes(region, structure=IN_PLANE) & ~region,
                                       structure=IN_PLANE)
        if n_holes == 0:
            continue
        sizes = np.bincount(holes.ravel())[1:]
        peaks = ndimage.maximum(smoothed[box], holes, np.arange(1, n_holes + 1))
        level = float(threshold[box[0].start])
        vessels = np.count_nonzero((sizes >= 2) & (sizes <= max_hole) & (peaks >= level + VESSEL_CONTRAST))
        result[index] = vessels * 1000.0 >= VESSEL_HOLES * region.sum()
    return result


def classical_lung_mask(array: np.ndarray, kind: str, spacing: tuple[float, float, float] | None = None, *,
                        downsample: bool = True) -> np.ndarray:
    """Lung labels (uint8 (z, y, x) 0/1/2, 1 = patient left = larger x) without any network.

    ``array``: (z, y, x) float HU (``kind="hu"``) or 8-bit grey values (``kind="uint8"``, one or
    more radiological-view slices). ``spacing`` (z, y, x) mm sets the morphology radii; None
    assumes a 350 mm field of view over the width.

    Steps: (1) dark voxels: < -400 HU after a 1-voxel in-plane blur, or below the slice's Otsu
    threshold for 8-bit; (2) outside air = dark regions touching the image edge in each slice,
    removed (one labelling of the volume with in-plane connectivity; 8-bit regions enclosing
    vessels are lung, and only their black part goes); (3) 3D connected
    components, keep the large ones (the two lungs, or one when the airways merge them); (4) per
    slice, on the crop around the lungs: drop small central components (trachea, main bronchi),
    split a component that straddles the body midline at its thinnest column, label each side
    by its x-centre; (5) per lung and slice, on the crop around that lung: closing, hole filling
    (vessels, enclosed consolidation) and filling of convex-hull concavities that face the chest
    wall (lateral or posterior) and hold soft-tissue density, so consolidation touching the
    pleura stays inside. Per-slice body statistics are computed for the whole volume at once and
    all per-slice work runs on crops, so a 300x512x512 volume takes seconds (see
    ``bench/results/lung_dice.md``).

    Rotated 2D slices (8-bit slices, or any single slice): some exported slices (about half of
    COVID-SemiSeg's) are rotated by 90 degrees, the lungs stacked top/bottom. When the two largest
    lung components lie above each other (centres further apart in rows than in columns), or a
    single centred component is taller than wide, the slice is turned back by 90 degrees
    clockwise, labelled as an upright slice and the labels turned back, so each lung gets ONE
    label. Which one is the patient's left is then a best guess: the rule assumes a 90-degree
    counter-clockwise rotation of a radiological view (``np.rot90(slice)``: patient left at the
    top, posterior at the image right), which is what the rotated COVID-SemiSeg slices inspected
    show (spine on the image right, descending aorta above it); the upper lung (smaller row
    index) gets label 1. A clockwise-rotated slice comes out with the sides swapped (and, for
    HU, the concavity rule of step (5) looking at the anterior side), never with a lung cut in
    half. The unlabeled "coronacases" slices of COVID-SemiSeg show the spine on the image LEFT:
    they are either clockwise turns (sides swapped by this rule) or mirrored exports of the
    volume arrays (rule right); nothing in a single 8-bit slice tells these apart reliably, so
    left/right of a rotated 2D slice is a best guess. Volumes of several HU slices are never
    taken for rotated.

    ``downsample`` (default): HU volumes of at least ``DOWNSAMPLE_FROM`` (384) pixels in-plane
    are labelled on a 2x2 block-mean grid (512 -> 256 px, as lungmask works at 256x256), the
    labels upsampled and their border re-decided at full resolution (within 2 pixels of it a
    voxel is lung when darker than the threshold). Measured (``bench/results/lung_dice.md``):
    300x512x512 phantom 3.6 s vs 9.5 s at full resolution, Dice 0.9950 vs 0.9955; 12 phantoms
    16x512x512 Dice mean 0.9918 vs 0.9927, share of infection inside the mask 0.786 vs 0.801
    (thin subpleural consolidation is what the coarser grid loses). ``downsample=False`` works
    at full resolution throughout.

    Limits: a lung slice entirely consolidated has no dark voxels and is missed; a slice of
    upside-down 8-bit data (COVID-SemiSeg has some) keeps left/right (a vertical flip does not
    swap columns) but the posterior rule of step (5) then looks at the anterior side.
    """
    array = np.asarray(array)
    if array.ndim == 2:
        array = array[None]
    if array.ndim != 3:
        raise ValueError(f"classical_lung_mask: need a (z, y, x) array, got shape {array.shape}")
    if kind not in ("hu", "uint8"):
        raise ValueError(f"classical_lung_mask: kind must be 'hu' or 'uint8', got {kind!r}")
    nz, ny, nx = array.shape
    if downsample and kind == "hu" and min(ny, nx) >= DOWNSAMPLE_FROM:
        return _half_resolution(array, spacing)
    pixel_mm = float(spacing[2]) if spacing is not None else ASSUMED_FOV_MM / nx

    cand, smoothed = _candidate(array, kind)
    # (2) outside air: per-slice components touching the in-plane border
    outside = _outside_air(cand, smoothed, kind)
    body = ~outside  # everything that is not outside air (the patient, the table)
    cand &= body
    del outside

    # (3) keep large 3D components; tiny specks (noise, bowel gas, esophagus) go
    labels, count = ndimage.label(cand)
    out = np.zeros(array.shape, dtype=np.uint8)
    if count == 0:
        return out
    sizes = np.bincount(labels.ravel())[1:]
    order = np.argsort(sizes)[::-1]
    keep_min = 0.05 * sizes[order[0]] if nz > 1 else 0.02 * sizes[order[0]]
    lut = np.zeros(count + 1, dtype=bool)
    lut[[i + 1 for i in order[:6] if sizes[i] >= keep_min]] = True
    cand = lut[labels]
    del labels

    # per-slice body statistics, for all slices at once: midline (mean x), width, area
    columns = body.sum(axis=1, dtype=np.int64)  # (z, x) body pixels per column
    areas = columns.sum(axis=1)
    xs = np.arange(nx)
    mids = np.where(areas > 0, (columns * xs).sum(axis=1) / np.maximum(areas, 1), (nx - 1) / 2.0)
    occupied = columns > 0
    first = np.argmax(occupied, axis=1)
    last = nx - 1 - np.argmax(occupied[:, ::-1], axis=1)
    widths = np.where(occupied.any(axis=1), last - first + 1, nx).astype(float)
    areas = np.where(areas > 0, areas, ny * nx).astype(float)
    del columns, occupied

    # crop every slice to the bounding box of all lung candidates (+ room for the closing)
    closing_r = max(1, int(round(CLOSING_MM / pixel_mm)))
    zs = np.nonzero(cand.any(axis=(1, 2)))[0]
    if zs.size == 0:
        return out
    y0, y1 = _extent(cand.any(axis=(0, 2)), closing_r + 2)
    x0, x1 = _extent(cand.any(axis=(0, 1)), closing_r + 2)
    may_rotate = _may_rotate(kind, nz)

    def label(z: int) -> None:  # writes slice z of ``out`` only
        crop = (z, slice(y0, y1), slice(x0, x1))
        if may_rotate and _is_rotated(cand[crop], mids[z] - x0, widths[z]):
            # undo the assumed counter-clockwise turn, label upright, turn the labels back
            body2d = np.rot90(body[crop], -1)
            xs_body = np.nonzero(body2d)[1]
            mid = float(xs_body.mean()) if xs_body.size else (body2d.shape[1] - 1) / 2.0
            width = float(np.ptp(xs_body) + 1) if xs_body.size else float(body2d.shape[1])
            labels2d = _label_slice(np.rot90(cand[crop], -1), body2d, np.rot90(smoothed[crop], -1), kind,
                                    closing_r, mid, width, areas[z])
            out[crop] = np.rot90(labels2d, 1)
        else:
            out[crop] = _label_slice(cand[crop], body[crop], smoothed[crop], kind, closing_r, mids[z] - x0,
                                     widths[z], areas[z])

    _per_slice(lambda i: label(int(zs[i])), len(zs))
    return out


def _per_slice(work: Callable[[int], np.ndarray | None], count: int) -> list:
    """``[work(i) for i in range(count)]`` on ``SLICE_THREADS`` threads, in order.

    Why: the per-slice steps are scipy.ndimage calls that release the GIL, so a volume's slices
    use every core instead of one (the lungs and their field were a third of plsynth-infer's time
    on 2 cores; BENCHMARKS.md). Each call touches its own slice only, so the result is the same.
    """
    if SLICE_THREADS < 2 or count < 2:
        return [work(i) for i in range(count)]
    with ThreadPoolExecutor(SLICE_THREADS, thread_name_prefix="lung-slices") as pool:
        return list(pool.map(work, range(count)))


def _slice_field(labels: np.ndarray, body: np.ndarray, grey: np.ndarray, may_rotate: bool, hu: bool) -> np.ndarray:
    """:func:`lung_field` on one slice (grey: 0..255 on a lung window).

    Consolidation has the density of soft tissue, so no threshold separates it from the heart or
    the chest wall; shape and texture do. The field is the thoracic cavity (body pixels at least
    ``CAVITY_FRACTION`` times as deep as the outermost aerated lung, i.e. inside the chest wall)
    less the mediastinum: the solid organs (bright and homogeneous: local s.d. of the bright
    pixels < ``FIELD_SOLID_STD`` grey levels over ``FIELD_WINDOW`` of the width, which heart,
    liver and muscle are and diseased lung, with its vessels, air bronchograms and ground glass,
    is not) that reach into the span between the two lungs' medial edges. HU volumes show the
    whole body, so there every solid region and bone (and a window's rim) is left out too. Each
    field pixel takes the label of the nearest lung pixel; only regions attached to a lung count.
    Rotated 2D slices are turned upright first. Measured: ``bench/results/lung_field.md``.
    """
    aerated = labels > 0
    if not aerated.any():
        return labels
    turned = may_rotate and _stacked(labels)
    if turned:
        labels, body, grey = (np.rot90(a, -1) for a in (labels, body, grey))
        aerated = labels > 0
    depth = ndimage.distance_transform_edt(np.pad(body, 1))[1:-1, 1:-1]  # the slice edge counts as body edge
    cavity = body & (depth >= CAVITY_FRACTION * np.percentile(depth[aerated], 2))
    # mediastinum seed: between the patient-right lung's (2, image left) and the left lung's medial edges
    xs = np.arange(labels.shape[1])
    right_edge = np.where(labels == 2, xs, -1).max(axis=1)
    left_edge = np.where(labels == 1, xs, labels.shape[1]).min(axis=1)
    between = (xs > right_edge[:, None]) & (xs < left_edge[:, None]) & (right_edge >= 0)[:, None] \
        & (left_edge < labels.shape[1])[:, None]
    window = max(5, int(FIELD_WINDOW * labels.shape[1])) | 1
    tissue = grey[body & (grey > UINT8_AIR)]
    split = _otsu(tissue) if tissue.size > 16 and np.ptp(tissue) > 0 else float(grey.max())
    # spread of the bright pixels only, so the lung's edge does not make the tissue next to it look textured
    bright = ((grey > split) & (grey < FIELD_BONE)).astype(np.float32)
    share = np.maximum(ndimage.uniform_filter(bright, window), 1e-6)
    mean = ndimage.uniform_filter(grey * bright, window) / share
    spread = np.sqrt(np.maximum(ndimage.uniform_filter(grey * grey * bright, window) / share - mean * mean, 0.0))
    solid = ndimage.binary_opening((bright > 0) & (spread < FIELD_SOLID_STD), iterations=1)
    organs, _ = ndimage.label(solid)
    touched = np.unique(organs[between & solid])
    mediastinum = np.isin(organs, touched[touched > 0])
    mediastinum = ndimage.binary_fill_holes(mediastinum) & ~aerated
    if hu:  # the whole body is in view: every solid organ, bone and the window's rim around them are out
        mediastinum |= ndimage.binary_dilation(solid | (grey >= FIELD_BONE), iterations=window) & ~aerated
    field = (cavity & ~mediastinum) | aerated
    pieces, _ = ndimage.label(field)
    attached = np.unique(pieces[aerated])
    field = np.isin(pieces, attached[attached > 0])
    nearest = ndimage.distance_transform_edt(~aerated, return_distances=False, return_indices=True)
    out = np.where(field, labels[nearest[0], nearest[1]], 0).astype(np.uint8)
    return np.rot90(out, 1) if turned else out


def _may_rotate(kind: str, n_slices: int) -> bool:
    """2D slices may come rotated by 90 degrees (8-bit exports, single slices); HU volumes never."""
    return kind == "uint8" or n_slices == 1


def _stacked(labels: np.ndarray) -> bool:
    """True when lungs 1 and 2 lie above each other (a 2D slice rotated by 90 degrees)."""
    if not ((labels == 1).any() and (labels == 2).any()):
        return False
    (ya, xa), (yb, xb) = ndimage.center_of_mass(labels > 0, labels, [1, 2])
    return abs(ya - yb) > abs(xa - xb)


def _half_resolution(hu: np.ndarray, spacing: tuple[float, float, float] | None) -> np.ndarray:
    """:func:`classical_lung_mask` on a 2x2 block-mean grid, upsampled, border re-decided at full size."""
    factor = 2
    nz, ny, nx = hu.shape
    py, px = (-ny) % factor, (-nx) % factor
    padded = np.pad(hu, ((0, 0), (0, py), (0, px)), mode="edge") if (py or px) else hu
    low = _block_mean(padded, factor)
    low_spacing = None if spacing is None else (spacing[0], spacing[1] * factor, spacing[2] * factor)
    low_labels = classical_lung_mask(low, "hu", spacing=low_spacing, downsample=False)
    del low, padded
    out = np.zeros(hu.shape, dtype=np.uint8)
    if not low_labels.any():
        return out
    labels = np.repeat(np.repeat(low_labels, factor, axis=1), factor, axis=2)[:, :ny, :nx]
    # work on the crop around the lungs only
    lungs = labels > 0
    margin = 2 * factor
    zz = np.nonzero(lungs.any(axis=(1, 2)))[0]
    y0, y1 = _extent(lungs.any(axis=(0, 2)), margin)
    x0, x1 = _extent(lungs.any(axis=(0, 1)), margin)
    crop = (slice(int(zz[0]), int(zz[-1]) + 1), slice(y0, y1), slice(x0, x1))
    lungs, labels = lungs[crop], labels[crop]
    # the blocky border is off by at most factor - 1 pixels: there, a voxel is lung when it is dark
    # at full resolution (a narrow band, so little subpleural consolidation is re-decided)
    inner = ndimage.binary_erosion(lungs, IN_PLANE, iterations=factor - 1)
    outer = ndimage.binary_dilation(lungs, IN_PLANE, iterations=factor - 1)
    keep = inner | (outer & ~inner & (hu[crop] < HU_THRESHOLD))
    for _ in range(factor - 1):  # border voxels outside the blocky mask take the nearest label
        labels = np.where(labels > 0, labels, ndimage.maximum_filter(labels, footprint=IN_PLANE))
    out[crop] = np.where(keep, labels, 0)
    return out


def _block_mean(array: np.ndarray, factor: int) -> np.ndarray:
    """Means of ``factor x factor`` in-plane blocks of a (z, y, x) array (y, x multiples of ``factor``), float32.

    Summed block offset by block offset: 6x faster than ``reshape(...).mean(axis=(2, 4))`` on
    300x512x512, and the same values for integer HU.
    """
    blocks = np.asarray(array, dtype=np.float32)
    blocks = blocks.reshape(blocks.shape[0], blocks.shape[1] // factor, factor, blocks.shape[2] // factor, factor)
    total = blocks[:, :, 0, :, 0].copy()
    for dy in range(factor):
        for dx in range(factor):
            if dy or dx:
                total += blocks[:, :, dy, :, dx]
    return total / np.float32(factor * factor)


def _label_slice(cand2d: np.ndarray, body2d: np.ndarray, smoothed2d: np.ndarray, kind: str, closing_r: int,
                 mid: float, width: float, area: float) -> np.ndarray:
    """Steps (4) and (5) for one upright slice (crop): 0/1/2 labels of the crop's shape."""
    sides = _split_slice(cand2d, mid, width, area)
    target = np.zeros(cand2d.shape, dtype=np.uint8)
    for label in (1, 2):
        lung2d = sides == label
        if lung2d.any():
            lung2d = _complete_lung(lung2d, smoothed2d, kind, closing_r, body2d, mid)
            target[lung2d & (target == 0)] = label
    return target


def _extent(occupied: np.ndarray, pad: int) -> tuple[int, int]:
    """[start, stop) of the True entries of a 1D mask, widened by ``pad`` and clipped."""
    idx = np.nonzero(occupied)[0]
    return max(0, int(idx[0]) - pad), min(occupied.size, int(idx[-1]) + 1 + pad)


def _is_rotated(mask2d: np.ndarray, mid: float, body_width: float) -> bool:
    """True when a 2D slice's lungs lie above each other (a slice rotated by 90 degrees)."""
    labels, count = ndimage.label(mask2d)
    if count == 0:
        return False
    areas = np.bincount(labels.ravel(), minlength=count + 1)[1:]
    order = np.argsort(areas)[::-1]
    big = [int(i) + 1 for i in order[:2] if areas[i] >= 0.15 * areas[order[0]]]
    if len(big) == 2:
        (ya, xa), (yb, xb) = ndimage.center_of_mass(mask2d, labels, big)
        return abs(ya - yb) > abs(xa - xb)
    box = ndimage.find_objects(labels)[big[0] - 1]
    height, width = box[0].stop - box[0].start, box[1].stop - box[1].start
    cx = 0.5 * (box[1].start + box[1].stop - 1)
    # one component: two merged lungs are wider than tall when upright; a single upright lung is
    # taller than wide but sits off the midline
    return height > width and abs(cx - mid) < 0.15 * body_width


def _split_slice(mask2d: np.ndarray, mid: float, body_width: float, body_area: float) -> np.ndarray:
    """Label one slice's lung components 1 (x > midline, patient left) or 2; drop central airways."""
    labels, count = ndimage.label(mask2d)
    if count == 0:
        return np.zeros(mask2d.shape, dtype=np.uint8)
    return _split_labels(labels, count, mid, body_width, body_area)


def _split_labels(labels: np.ndarray, count: int, mid: float, body_width: float, body_area: float) -> np.ndarray:
    out = np.zeros(labels.shape, dtype=np.uint8)
    areas = np.bincount(labels.ravel(), minlength=count + 1)[1:].astype(float)
    largest = float(areas.max())
    boxes = ndimage.find_objects(labels)
    for index in range(1, count + 1):
        box = boxes[index - 1]
        if box is None:
            continue
        comp = labels[box] == index
        area = float(areas[index - 1])
        xs = np.nonzero(comp)[1] + box[1].start
        centre = float(xs.mean())
        small = area < 0.25 * largest and area < 0.02 * body_area
        if small and abs(centre - mid) < 0.15 * body_width:
            continue  # trachea / main bronchus cross-section
        left_share = float(np.mean(xs > mid))
        target = out[box]
        if 0.1 < left_share < 0.9:  # straddles the midline: two lungs merged (anterior junction, hilum)
            cols = np.arange(box[1].start, box[1].stop)
            band = (cols > mid - 0.1 * body_width) & (cols < mid + 0.1 * body_width)
            thickness = np.where(band, comp.sum(axis=0), np.iinfo(np.int64).max)
            cut = int(cols[np.argmin(thickness)])
            target[comp & (cols[None, :] > cut)] = 1
            target[comp & (cols[None, :] <= cut)] = 2
        else:
            target[comp] = 1 if centre > mid else 2
    return out


def _complete_lung(lung2d: np.ndarray, intensity: np.ndarray, kind: str, closing_r: int,
                   body2d: np.ndarray, mid: float) -> np.ndarray:
    """Close, fill holes and fill chest-wall-facing concavities of one lung in one slice.

    Works on the crop around the lung (everything it adds lies within the closing radius or the
    lung's convex hull) and returns a mask of ``lung2d``'s shape.
    """
    ys = np.nonzero(lung2d.any(axis=1))[0]
    xs = np.nonzero(lung2d.any(axis=0))[0]
    pad = closing_r + 1
    # the padded crop; zeros beyond the array edge, like the zero padding of the original slice
    yy = slice(int(ys[0]) - pad, int(ys[-1]) + 1 + pad)
    xx = slice(int(xs[0]) - pad, int(xs[-1]) + 1 + pad)
    ny, nx = lung2d.shape
    inner_y = slice(max(0, yy.start), min(ny, yy.stop))
    inner_x = slice(max(0, xx.start), min(nx, xx.stop))
    local = np.zeros((yy.stop - yy.start, xx.stop - xx.start), dtype=bool)
    at = (slice(inner_y.start - yy.start, inner_y.stop - yy.start),
          slice(inner_x.start - xx.start, inner_x.stop - xx.start))
    local[at] = lung2d[inner_y, inner_x]
    closed = ndimage.binary_closing(local, structure=_disk(closing_r))[at] | lung2d[inner_y, inner_x]
    done = np.zeros_like(lung2d)
    done[inner_y, inner_x] = _fill_concavities(closed, intensity[inner_y, inner_x], kind,
                                               body2d[inner_y, inner_x], mid - inner_x.start)
    return done


def _convex_hull(mask: np.ndarray) -> np.ndarray:
    """Filled convex hull of a 2D mask (each pixel a diamond of radius 1/2, as skimage's convex_hull_image).

    qhull on the diamond tips of the boundary pixels, then each row's span is the intersection of the
    hull's half-planes along that row: O(pixels) instead of a point-in-polygon test per pixel.
    """
    from scipy.spatial import ConvexHull

    edge = mask & ~ndimage.binary_erosion(mask)
    points = np.argwhere(edge).astype(np.float64)
    tips = (points[:, None, :] + np.array([[-0.5, 0.0], [0.5, 0.0], [0.0, -0.5], [0.0, 0.5]])).reshape(-1, 2)
    equations = ConvexHull(tips).equations  # rows (ny, nx, offset): ny*y + nx*x + offset <= 0 inside
    rows = np.arange(mask.shape[0], dtype=np.float64)
    lo = np.full(rows.shape, -np.inf)
    hi = np.full(rows.shape, np.inf)
    eps = 1e-6  # a pixel centre exactly on a hull edge is outside, as in skimage
    for ny_, nx_, off in equations:
        bound = -(ny_ * rows + off)  # nx_ * x <= bound
        if nx_ > eps:
            hi = np.minimum(hi, bound / nx_ - eps)
        elif nx_ < -eps:
            lo = np.maximum(lo, bound / nx_ + eps)
        else:  # horizontal edge: the whole row is in or out
            outside = bound < -eps
            lo[outside], hi[outside] = np.inf, -np.inf
    cols = np.arange(mask.shape[1], dtype=np.float64)
    return (cols[None, :] >= lo[:, None]) & (cols[None, :] <= hi[:, None])


def _fill_concavities(lung2d: np.ndarray, intensity: np.ndarray, kind: str, body2d: np.ndarray,
                      mid: float) -> np.ndarray:
    lung2d = ndimage.binary_fill_holes(lung2d)
    if lung2d.sum() < 20 or kind != "hu":
        # 8-bit slices: no density to tell consolidation from heart or chest wall, and cropped
        # slices (COVID-SemiSeg) give hulls that swallow the mediastinum: holes only
        return lung2d
    hull = _convex_hull(lung2d)
    pockets, count = ndimage.label(hull & ~lung2d & body2d)
    if count == 0:
        return lung2d
    ys, xs = np.nonzero(lung2d)
    cy, cx = float(ys.mean()), float(xs.mean())
    lung_area = float(ys.size)
    index = np.arange(1, count + 1)
    sizes = np.bincount(pockets.ravel(), minlength=count + 1)[1:]
    centres = np.array(ndimage.center_of_mass(pockets > 0, pockets, index)).reshape(-1, 2)
    density = np.asarray(ndimage.mean(intensity, pockets, index))
    pcy, pcx = centres[:, 0], centres[:, 1]
    lateral = np.abs(pcx - mid) > 0.8 * abs(cx - mid)
    posterior = (pcy > cy) & (np.abs(pcx - mid) > 0.6 * abs(cx - mid))
    # mediastinal side (heart, hilum, aorta are concave there by nature), bone (ribs, spine) and
    # air are not consolidation
    accept = (sizes >= 4) & (sizes <= 1.5 * lung_area) & (lateral | posterior) & (density > -600.0) & (density < 150.0)
    if not accept.any():
        return lung2d
    lut = np.concatenate([[False], accept])
    return ndimage.binary_fill_holes(lung2d | lut[pockets])


__all__ = [
    "LUNG_BACKENDS",
    "FIELD_ALGORITHM",
    "lung_mask",
    "lung_field",
    "lung_record",
    "inside_lungs",
    "classical_lung_mask",
    "available_lung_backends",
    "default_lung_backend",
    "default_lungmask_model",
]
