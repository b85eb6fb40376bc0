"""Synthetic chest-CT phantoms: the embedded default data for demos, tests and benchmarks.

A phantom is an axial chest CT in HU with its true lung labels and infection mask, made from
analytic shapes plus smooth random fields (vectorised numpy + scipy.ndimage; a 24x128x128
phantom takes a fraction of a second, 300x512x512 a few tens of seconds and ~2.5 GB peak).

Anatomy, in a normalised frame (u: -1 patient right .. +1 patient left, v: -1 anterior .. +1
posterior, both scaled by half the field of view; t: 0 inferior .. 1 superior end of the volume):

- outside air (-1000 HU), a body ellipse with subcutaneous fat (-100), muscle (+40), ribs
  (slanted stripes in the wall, +700), sternum, a vertebra (body +250 with a cortical rim,
  spinal canal +15, posterior arch), the heart and descending aorta (+40),
- two lungs (-850 HU with a posterior gravity gradient), tapered to the apex and cut by a
  diaphragm dome at the base (so low slices show only the costophrenic rim), carved by the heart
  and aorta; vessels (+40) are tubes where two smooth random fields both cross zero, thicker
  near the hilum,
- the trachea (air lumen, soft-tissue wall) above the carina and both main bronchi running down
  and out into the hila (so the airways connect the two lungs, as in real scans),
- COVID-like lesions inside the lungs only: ground-glass opacities (-650..-350 HU, vessels stay
  visible through them), consolidations (-100..+40 HU) and mixed ones, of varied number, size
  and place, many subpleural (centred on the lung border, so they touch the pleura), some
  volumes lesion-free,
- partial-volume blur (Gaussian, ~0.7 voxel in-plane) and scanner-like correlated noise
  (12-30 HU), clipped to the scanner range [-1024, 3071] and rounded to integers (so the int16
  NIfTI stores exactly ``hu``).

Truth masks are the sharp analytic shapes: ``lung`` (0/1/2; 1 = patient LEFT = larger x, the
project contract) includes vessels, intrapulmonary airways and lesions but not the trachea and
extrapulmonary bronchi; ``infection`` (0/1) marks lesion voxels inside the lungs.

Arrays are (z, y, x) in LPS order: x toward the patient's left, y toward posterior, z toward
superior, so ``hu[z]`` is the usual radiological view. Files follow the COVID-19-20 layout (see
:func:`write_phantom_dataset`).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from plsynth.config import PHANTOM_MIN_SIDE

logger = logging.getLogger(__name__)

HU_MIN, HU_MAX = -1024.0, 3071.0  # scanner range of 12-bit CT
LUNG_HU = -850.0
LESION_FREE_EVERY = 4  # write_phantom_dataset: volume i is lesion-free when i % 4 == 3 (1 in 4)


@dataclass(frozen=True)
class Phantom:
    """One synthetic chest CT with its truth (arrays (z, y, x), LPS order)."""

    hu: np.ndarray  # float32 HU, integers in [-1024, 3071]
    lung: np.ndarray  # uint8 0 background, 1 patient-left lung (larger x), 2 patient-right lung
    infection: np.ndarray  # uint8 0/1, only inside the lungs
    spacing: tuple[float, float, float]  # (z, y, x) mm
    name: str

    @property
    def infection_fraction(self) -> float:
        """Share of lung voxels that are infected (0.0 for lesion-free volumes)."""
        lung_voxels = int(np.count_nonzero(self.lung))
        return float(np.count_nonzero(self.infection)) / lung_voxels if lung_voxels else 0.0


def _smooth_field(rng: np.random.Generator, shape: tuple[int, int, int], spacing: tuple[float, float, float],
                  cell_mm: float, sigma_cells: float = 1.2) -> np.ndarray:
    """A smooth random field of unit std on ``shape``: Gaussian-filtered noise on a coarse grid of
    ``cell_mm`` cells, linearly upsampled (cheap even for 300x512x512)."""
    coarse = tuple(max(4, int(math.ceil(n * s / cell_mm)) + 2) for n, s in zip(shape, spacing))
    field = ndimage.gaussian_filter(rng.standard_normal(coarse).astype(np.float32), sigma_cells, mode="wrap")
    field /= field.std() + 1e-6
    # map the full grid into the coarse grid's interior (avoid the edge cells)
    coords = [np.linspace(1.0, c - 2.0, n, dtype=np.float32) for n, c in zip(shape, coarse)]
    # separable linear interpolation, one axis at a time (cheaper than ndimage.zoom on big grids)
    out = field
    for axis, grid in enumerate(coords):
        lo = np.floor(grid).astype(np.int64)
        frac = (grid - lo).astype(np.float32)
        a = np.take(out, lo, axis=axis)
        b = np.take(out, lo + 1, axis=axis)
        shape_f = [1, 1, 1]
        shape_f[axis] = len(grid)
        f = frac.reshape(shape_f)
        out = a * (1.0 - f) + b * f
    return out.astype(np.float32, copy=False)


def _superellipse(du: np.ndarray, dv: np.ndarray, au, av, power: float = 2.0) -> np.ndarray:
    return np.abs(du / au) ** power + np.abs(dv / av) ** power


def make_phantom(seed: int, shape: tuple[int, int, int] = (24, 128, 128), *, lesions: bool | None = None,
                 name: str | None = None) -> Phantom:
    """Draw one phantom; the same ``seed`` and ``shape`` give identical arrays.

    ``lesions``: None lets the seed decide (lesion-free with probability 1/4); True/False forces it.
    ``shape`` is (slices, rows, columns), each >= PHANTOM_MIN_SIDE. The field of view is 320-400 mm (pixel
    = fov / columns); slices are ~300 mm / slices thick, clipped to 1-5 mm (24 slices: 5 mm).
    """
    nz, ny, nx = (int(n) for n in shape)
    if min(nz, ny, nx) < PHANTOM_MIN_SIDE:
        raise ValueError(f"phantom shape must be at least {PHANTOM_MIN_SIDE} in every axis, got {tuple(shape)}")
    rng = np.random.default_rng(seed)
    fov = float(rng.uniform(320.0, 400.0))
    dx = fov / nx
    dz = float(np.clip(rng.uniform(260.0, 320.0) / nz, 1.0, 5.0))
    spacing = (round(dz, 4), round(dx, 4), round(dx, 4))
    half = fov / 2.0  # mm per normalised unit

    t = ((np.arange(nz, dtype=np.float32) + 0.5) / nz).reshape(nz, 1, 1)
    v = ((np.arange(ny, dtype=np.float32) + 0.5 - ny / 2.0) * dx / half).reshape(1, ny, 1)
    u = ((np.arange(nx, dtype=np.float32) + 0.5 - nx / 2.0) * dx / half).reshape(1, 1, nx)
    full = (nz, ny, nx)

    # --- body and chest wall -------------------------------------------------------------
    bax = float(rng.uniform(0.80, 0.90))
    bay = bax * float(rng.uniform(0.68, 0.78))
    bcy = 0.05
    rho = np.sqrt((u / bax) ** 2 + ((v - bcy) / bay) ** 2)  # (1, ny, nx), 1 at the skin
    rho = np.broadcast_to(rho, (1, ny, nx))
    hu = np.full(full, -1000.0, dtype=np.float32)
    body2d = rho < 1.0
    fat_in = 1.0 - float(rng.uniform(0.05, 0.09))
    slab = np.where(body2d, np.where(rho > fat_in, -100.0, 40.0), -1000.0).astype(np.float32)
    hu[:] = slab
    # ribs: slanted stripes in a ring inside the wall, none near the midline (sternum / spine)
    theta = np.arctan2(v - bcy, u)  # (1, ny, nx)
    ring = (rho > fat_in - 0.07) & (rho < fat_in - 0.03) & (np.abs(u) > 0.18)
    phase = 9.0 * t + 1.2 * np.abs(np.sin(theta)) + float(rng.uniform(0, 1))
    ribs = ring & (np.cos(2 * np.pi * phase) > 0.45)
    hu[ribs] = 700.0
    top = bcy - bay
    sternum = _superellipse(u, v - (top + 0.09), 0.08, 0.035) < 1.0
    hu[np.broadcast_to(sternum, full) & (t > 0.25)] = 600.0
    # vertebra: body with cortical rim, canal, posterior arch and spinous process
    vcy = bcy + 0.52 * bay
    rv = 0.085
    d_body = np.sqrt(u**2 + (v - vcy) ** 2)
    d_canal = np.sqrt(u**2 + (v - vcy - rv - 0.045) ** 2)
    spine_mask = d_body < rv
    spine = np.where(spine_mask, np.where(d_body > rv - 0.015, 600.0, 250.0), np.nan)
    arch = (d_canal < 0.08) & (d_canal >= 0.045)
    spinous = _superellipse(u, v - (vcy + rv + 0.14), 0.025, 0.06) < 1.0
    spine = np.where(arch | spinous, 500.0, spine)
    spine = np.where(d_canal < 0.045, 15.0, spine)
    spine3 = np.broadcast_to(spine, full)
    hu = np.where(np.isnan(spine3), hu, spine3).astype(np.float32)

    # --- heart, aorta --------------------------------------------------------------------
    t_heart = float(rng.uniform(0.45, 0.55))
    heart_scale = np.clip((t_heart + 0.1 - t) / 0.25, 0.0, 1.0) ** 0.5  # shrinks toward its top
    hcx = 0.10 * bax / 0.85
    heart = _superellipse(u - hcx, v + 0.16, 0.30 * bax / 0.85 * heart_scale + 1e-6,
                          0.24 * heart_scale + 1e-6) < 1.0
    acx, acy = 0.12, vcy - 0.12
    aorta = np.broadcast_to((u - acx) ** 2 + (v - acy) ** 2 < 0.05**2, full)
    hu[heart] = 40.0
    hu[aorta] = 45.0

    # --- lungs ---------------------------------------------------------------------------
    lung = np.zeros(full, dtype=np.uint8)
    t_apex = float(rng.uniform(0.93, 1.03))
    for label, sign in ((1, 1.0), (2, -1.0)):  # 1 = patient left = +u = larger x
        cx = sign * 0.46 * bax * float(rng.uniform(0.97, 1.03))
        lax = 0.36 * bax * float(rng.uniform(0.95, 1.05))
        lay = 0.74 * bay * float(rng.uniform(0.95, 1.05))
        cy = 0.0
        t_base = float(rng.uniform(0.0, 0.06)) + (0.03 if label == 2 else 0.0)  # liver lifts the right dome
        dome = float(rng.uniform(0.14, 0.24))
        taper = np.clip((t_apex - t) / (t_apex - t_base), 0.0, 1.0) ** 0.3
        r0 = _superellipse(u - cx, v - cy, lax, lay, 2.2)
        dome_height = t_base + dome * np.clip(1.0 - r0, 0.0, 1.0) * (1.0 - 0.35 * np.clip(v, 0, 1))
        # the medial base rises (mediastinum, pericardial fat): low slices show an open crescent, not a ring
        dome_height = dome_height + 0.12 * np.clip(sign * (cx - u) / lax, 0.0, 1.0) ** 1.5
        inside = (_superellipse(u - cx, v - cy, lax * taper + 1e-6, lay * taper + 1e-6, 2.2) < 1.0) & (t > dome_height)
        inside &= ~heart & ~aorta & np.broadcast_to((rho < fat_in - 0.08) & (d_body > rv + 0.02), full)
        lung[inside] = label
    lung_any = lung > 0
    hu[lung_any] = (LUNG_HU + 60.0 * np.clip(np.broadcast_to(v, full), -0.5, 0.5))[lung_any]

    # vessels: tubes where two smooth fields both cross zero; thicker near the hila
    g1 = _smooth_field(rng, full, spacing, cell_mm=9.0)
    g2 = _smooth_field(rng, full, spacing, cell_mm=9.0)
    hilum_d2 = (np.abs(u) - 0.24) ** 2 + (v - 0.0) ** 2 + ((t - 0.45) * 1.2) ** 2
    width = 0.11 + 0.14 * np.exp(-hilum_d2 / 0.05)
    vessels = (np.abs(g1) < width) & (np.abs(g2) < width) & lung_any
    hu[vessels] = 40.0
    del g1, g2

    # airways: trachea above the carina, main bronchi down and out into the hila
    t_carina = float(rng.uniform(0.55, 0.62))
    air_lumen = np.zeros(full, dtype=bool)
    air_wall = np.zeros(full, dtype=bool)
    trachea_r = 0.055
    d_tr = np.sqrt(u**2 + (v + 0.05) ** 2)
    above = t >= t_carina
    air_wall |= above & (d_tr < trachea_r + 0.018)
    air_lumen |= above & (d_tr < trachea_r)
    frac = np.clip((t_carina - t) / 0.15, 0.0, 1.0)
    in_range = (t < t_carina + 0.02) & (t > t_carina - 0.15)
    for sign in (1.0, -1.0):
        d_br = np.sqrt((u - sign * 0.24 * frac) ** 2 + (v + 0.05 - 0.05 * frac) ** 2)
        air_wall |= in_range & (d_br < 0.04 + 0.015)
        air_lumen |= in_range & (d_br < 0.04)
    hu[air_wall & ~lung_any] = 20.0
    hu[air_lumen] = -1000.0

    # --- lesions -------------------------------------------------------------------------
    infection = np.zeros(full, dtype=np.uint8)
    if lesions is None:
        lesions = bool(rng.random() >= 0.25)
    n_lesions = int(rng.integers(1, 11)) if lesions else 0
    for k in range(n_lesions):
        _paint_lesion(rng, hu, lung, infection, spacing, subpleural=(k == 0 and rng.random() < 0.8) or rng.random() < 0.5)

    # --- partial volume and scanner noise -------------------------------------------------
    hu = ndimage.gaussian_filter(hu, sigma=(0.35, 0.7, 0.7), mode="nearest")
    noise = rng.standard_normal(full, dtype=np.float32)
    noise = ndimage.gaussian_filter(noise, sigma=(0.0, 0.8, 0.8), mode="wrap")
    noise *= float(rng.uniform(12.0, 30.0)) / (float(noise.std()) + 1e-6)
    hu += noise
    del noise
    np.clip(hu, HU_MIN, HU_MAX, out=hu)
    np.rint(hu, out=hu)
    return Phantom(hu=hu.astype(np.float32, copy=False), lung=lung, infection=infection, spacing=spacing,
                   name=name or f"phantom-s{seed}")


def _paint_lesion(rng: np.random.Generator, hu: np.ndarray, lung: np.ndarray, infection: np.ndarray,
                  spacing: tuple[float, float, float], subpleural: bool) -> None:
    """Paint one lesion (GGO, consolidation or mixed) into ``hu`` and ``infection``, inside the lung only."""
    nz, ny, nx = lung.shape
    # a random lung voxel by rejection sampling (lungs fill ~15-25 % of the volume)
    for _ in range(2000):
        z, y, x = int(rng.integers(nz)), int(rng.integers(ny)), int(rng.integers(nx))
        if lung[z, y, x]:
            break
    else:
        return
    if subpleural:  # march away from the lung's centre line until leaving the lung: the border
        side = lung[z, y, x]
        ys, xs = np.nonzero(lung[z] == side)
        cy, cx = ys.mean(), xs.mean()
        dy, dx_ = y - cy, x - cx
        norm = math.hypot(dy, dx_) or 1.0
        dy, dx_ = dy / norm, dx_ / norm
        py, px = float(y), float(x)
        while True:
            qy, qx = py + dy, px + dx_
            iy, ix = int(round(qy)), int(round(qx))
            if not (0 <= iy < ny and 0 <= ix < nx) or lung[z, iy, ix] != side:
                break
            py, px = qy, qx
        y, x = int(round(py)), int(round(px))
    kind = rng.choice(["ggo", "consolidation", "mixed"], p=[0.5, 0.3, 0.2])
    radius_mm = float(rng.uniform(8.0, 40.0) if kind == "ggo" else rng.uniform(6.0, 24.0))
    axes_mm = radius_mm * rng.uniform(0.7, 1.3, size=3)
    axes = axes_mm / np.asarray(spacing)  # voxels
    box = [(max(0, int(c - 1.5 * a) - 1), min(n, int(c + 1.5 * a) + 2)) for c, a, n in zip((z, y, x), axes, lung.shape)]
    sl = tuple(slice(a, b) for a, b in box)
    zz, yy, xx = np.ogrid[sl]
    rr = np.sqrt(((zz - z) / axes[0]) ** 2 + ((yy - y) / axes[1]) ** 2 + ((xx - x) / axes[2]) ** 2)
    local_shape = tuple(b - a for a, b in box)
    wobble = _smooth_field(rng, local_shape, spacing, cell_mm=max(4.0, radius_mm / 2.0))
    edge = 1.0 + 0.3 * wobble - rr  # > 0 inside the (lobulated) lesion
    weight = np.clip(edge / 0.25 + 0.5, 0.0, 1.0)  # soft edge: 0.5 at the nominal border
    inside_lung = lung[sl] > 0
    target = float(rng.uniform(-650.0, -350.0)) if kind != "consolidation" else float(rng.uniform(-100.0, 40.0))
    region = hu[sl]
    lesion_hu = LUNG_HU + (target - LUNG_HU) * weight
    if kind == "mixed":  # consolidated core
        core = np.clip((0.55 + 0.2 * wobble - rr) / 0.15 + 0.5, 0.0, 1.0)
        lesion_hu = np.maximum(lesion_hu, LUNG_HU + (float(rng.uniform(-80.0, 30.0)) - LUNG_HU) * core)
    region[...] = np.where(inside_lung, np.maximum(region, lesion_hu), region)
    infection[sl] |= ((weight >= 0.5) & inside_lung).astype(np.uint8)


def _nifti(array_lps: np.ndarray, spacing: tuple[float, float, float], dtype: type):
    """NIfTI image for an LPS (z, y, x) array: stored as (x, y, z) with affine diag(-sx, -sy, sz).

    nibabel's world is RAS+; voxel axis i runs toward L (world -x), j toward P (world -y), k
    toward S, so the axis codes are ('L', 'P', 'S') and reorienting to LPS returns ``array_lps``.
    """
    import nibabel as nib

    sz, sy, sx = spacing
    affine = np.diag([-sx, -sy, sz, 1.0])
    data = np.ascontiguousarray(np.transpose(array_lps, (2, 1, 0))).astype(dtype)
    image = nib.Nifti1Image(data, affine)
    image.header.set_xyzt_units("mm")
    image.header.set_qform(affine, code=1)
    image.header.set_sform(affine, code=1)
    return image


def _save_nifti(image, path: Path) -> None:
    import nibabel as nib

    from plsynth.atomic import atomic_write

    with atomic_write(path) as tmp:
        nib.save(image, tmp)


def phantom_paths(out: Path, name: str) -> tuple[Path, Path, Path]:
    """(ct, seg, lung) file paths of phantom ``name`` in the COVID-19-20 layout."""
    out = Path(out)
    return out / f"{name}_ct.nii.gz", out / f"{name}_seg.nii.gz", out / f"{name}_lung.nii.gz"


def dataset_seed(seed: int, index: int) -> int:
    """The make_phantom seed of volume ``index`` of a dataset drawn with ``seed`` (independent streams)."""
    return int(np.random.SeedSequence([int(seed), int(index)]).generate_state(1)[0])


def write_phantom_dataset(out: Path, n: int, seed: int, shape: tuple[int, int, int] = (24, 128, 128)) -> list[Path]:
    """Write ``n`` phantoms into ``out`` in the COVID-19-20 layout; returns the CT paths.

    Per volume ``phantom-<iii>``: ``<name>_ct.nii.gz`` (int16 HU), ``<name>_seg.nii.gz`` (uint8
    infection 0/1) and ``<name>_lung.nii.gz`` (uint8 true lungs 0/1/2, 1 = patient left). Volume i
    is lesion-free when ``i % 4 == 3`` (1 in 4). Idempotent: a volume whose three files all exist
    is skipped (not redrawn); each file is written atomically (temporary name, then rename), so an
    interrupted run leaves no half-written file.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for index in range(n):
        name = f"phantom-{index:03d}"
        ct_path, seg_path, lung_path = phantom_paths(out, name)
        written.append(ct_path)
        if ct_path.exists() and seg_path.exists() and lung_path.exists():
            logger.debug("%s exists, skipped", ct_path)
            continue
        phantom = make_phantom(dataset_seed(seed, index), shape, lesions=(index % LESION_FREE_EVERY != 3), name=name)
        for path, array, dtype in ((seg_path, phantom.infection, np.uint8), (lung_path, phantom.lung, np.uint8),
                                   (ct_path, phantom.hu, np.int16)):
            if not path.exists():
                _save_nifti(_nifti(array, phantom.spacing, dtype), path)
        logger.info("wrote %s (%.1f %% of lung infected)", ct_path, 100.0 * phantom.infection_fraction)
    return written


__all__ = ["Phantom", "make_phantom", "write_phantom_dataset", "phantom_paths", "dataset_seed", "HU_MIN", "HU_MAX"]
