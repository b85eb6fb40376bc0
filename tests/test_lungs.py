"""Lung masks: the classical back-end against phantom truth, 8-bit slices, real slices, lungmask plumbing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from plsynth.data.image import CTImage
from plsynth.data.lungs import available_lung_backends, classical_lung_mask, default_lung_backend, lung_mask
from plsynth.data.phantom import make_phantom
from plsynth.errors import InputError

SHAPE = (20, 128, 128)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


def _ct(hu: np.ndarray, spacing) -> CTImage:
    return CTImage(array=hu, kind="hu", spacing=spacing, source=Path("phantom.nii.gz"))


@pytest.fixture(scope="module")
def phantoms():
    # a few seeds; the test below also picks the most lesion-heavy of them
    return [make_phantom(seed, SHAPE) for seed in (0, 3, 4, 7)]


def test_classical_lungs_match_phantom_truth_with_correct_sides(phantoms):
    heaviest = max(phantoms, key=lambda p: p.infection_fraction)
    assert heaviest.infection_fraction > 0.1  # the set really contains a lesion-heavy volume
    for p in phantoms:
        mask = lung_mask(_ct(p.hu, p.spacing), "classical")
        assert mask.dtype == np.uint8 and mask.shape == p.lung.shape
        assert dice(mask > 0, p.lung > 0) >= 0.95, p.name
        assert dice(mask == 1, p.lung == 1) >= 0.9 and dice(mask == 2, p.lung == 2) >= 0.9, p.name


def test_dense_infection_mostly_stays_inside_the_classical_mask(phantoms):
    heaviest = max(phantoms, key=lambda p: p.infection_fraction)
    mask = classical_lung_mask(heaviest.hu, "hu", spacing=heaviest.spacing)
    covered = np.logical_and(mask > 0, heaviest.infection > 0).sum() / heaviest.infection.sum()
    assert covered >= 0.6  # measured ~0.7-0.95 on these phantoms; subpleural caps beyond the hull are missed


def test_classical_back_end_works_on_an_8bit_slice_made_from_a_phantom():
    p = make_phantom(5, (16, 160, 144))
    z = int(np.argmax((p.lung > 0).sum(axis=(1, 2))))
    window = (-1250.0, 250.0)
    grey = np.rint(np.clip((p.hu[z] - window[0]) / (window[1] - window[0]), 0, 1) * 255).astype(np.float32)
    image = CTImage(array=grey[None], kind="uint8", spacing=None, source=Path("slice.png"))
    mask = lung_mask(image)
    assert mask.shape == (1, 160, 144)
    assert dice(mask[0] > 0, p.lung[z] > 0) >= 0.93
    assert dice(mask[0] == 1, p.lung[z] == 1) >= 0.9  # patient left = larger column
    # upside-down slices (COVID-SemiSeg has some) keep left/right: a vertical flip does not swap columns
    flipped = lung_mask(CTImage(array=grey[None, ::-1].copy(), kind="uint8", spacing=None, source=Path("f.png")))
    # (lower bar: the concavity rule for "posterior" then looks at the anterior side)
    assert dice(flipped[0, ::-1] == 1, p.lung[z] == 1) >= 0.8
    assert dice(flipped[0, ::-1] == 2, p.lung[z] == 2) >= 0.8


@pytest.mark.parametrize("turns", [1, -1])
def test_rotated_8bit_slice_gives_each_lung_one_label(turns):
    # about half of COVID-SemiSeg's slices are rotated by 90 degrees: lungs stacked top/bottom
    p = make_phantom(5, (16, 160, 144))
    z = int(np.argmax((p.lung > 0).sum(axis=(1, 2))))
    grey = np.rint(np.clip((p.hu[z] + 1250.0) / 1500.0, 0, 1) * 255).astype(np.float32)
    rotated, truth = np.rot90(grey, turns).copy(), np.rot90(p.lung[z], turns)
    mask = lung_mask(CTImage(array=rotated[None], kind="uint8", spacing=None, source=Path("rot.png")))[0]
    assert mask.shape == rotated.shape
    assert dice(mask > 0, truth > 0) >= 0.93
    majority = {}
    for lung in (1, 2):
        got = mask[(truth == lung) & (mask > 0)]
        counts = np.bincount(got, minlength=3)[1:]
        majority[lung] = int(np.argmax(counts)) + 1
        assert counts.max() >= 0.97 * counts.sum(), (lung, counts)  # never half of a lung with each label
    assert majority[1] != majority[2]
    if turns == 1:  # the documented best guess: counter-clockwise rotation, patient left at the top
        assert majority == {1: 1, 2: 2}
    # an upright slice of the same phantom is not taken for a rotated one
    upright = lung_mask(CTImage(array=grey[None], kind="uint8", spacing=None, source=Path("up.png")))[0]
    assert dice(upright == 1, p.lung[z] == 1) >= 0.9 and dice(upright == 2, p.lung[z] == 2) >= 0.9


def test_rotated_hu_single_slice_is_split_along_rows_too():
    p = make_phantom(3, (12, 128, 128))
    z = int(np.argmax((p.lung > 0).sum(axis=(1, 2))))
    mask = classical_lung_mask(np.rot90(p.hu[z]).copy(), "hu", spacing=p.spacing)[0]
    truth = np.rot90(p.lung[z])
    assert dice(mask == 1, truth == 1) >= 0.9 and dice(mask == 2, truth == 2) >= 0.9


def test_wide_hu_volumes_are_labelled_at_half_resolution_without_losing_accuracy():
    # >= 384 px in-plane: labelled on a 2x2 block-mean grid, border re-decided at full size (odd sizes padded)
    p = make_phantom(10, (8, 390, 385), lesions=True)
    assert p.infection_fraction > 0.05
    fast = classical_lung_mask(p.hu, "hu", spacing=p.spacing)
    full = classical_lung_mask(p.hu, "hu", spacing=p.spacing, downsample=False)
    assert fast.shape == p.lung.shape and fast.dtype == np.uint8
    assert dice(fast > 0, p.lung > 0) >= 0.97
    assert dice(fast == 1, p.lung == 1) >= 0.95 and dice(fast == 2, p.lung == 2) >= 0.95
    assert dice(fast > 0, full > 0) >= 0.98
    covered = np.logical_and(fast > 0, p.infection > 0).sum() / p.infection.sum()
    assert covered >= 0.6


def test_classical_on_empty_air_returns_no_lung():
    air = np.full((3, 32, 32), -1000.0, dtype=np.float32)
    assert classical_lung_mask(air, "hu").sum() == 0


def test_classical_finds_two_lungs_on_real_covid_semiseg_slices(semiseg_root: Path):
    from PIL import Image

    images = sorted((semiseg_root / "labeled" / "images").glob("*.jpg"))[:3]
    images += sorted((semiseg_root / "unlabeled" / "images").glob("*.jpg"))[::400][:3]
    for path in images:
        grey = np.asarray(Image.open(path).convert("L"), dtype=np.float32)
        mask = lung_mask(CTImage(array=grey[None], kind="uint8", spacing=None, source=path))[0]
        left, right = (mask == 1), (mask == 2)
        assert left.sum() > 0.01 * mask.size and right.sum() > 0.01 * mask.size, path.name
        (ly, lx), (ry, rx) = np.argwhere(left).mean(axis=0), np.argwhere(right).mean(axis=0)
        if path.name == "0.jpg" and path.parent.parent.name == "labeled":  # stored rotated: lungs top/bottom
            assert abs(ly - ry) > abs(lx - rx), path.name
        if abs(ly - ry) > abs(lx - rx):  # rotated slice: split along rows, upper lung = patient left
            assert ly < ry and np.nonzero(left)[0].max() < np.nonzero(right)[0].max(), path.name
        else:
            assert lx > rx and np.nonzero(left)[1].min() > np.nonzero(right)[1].min(), path.name


# --- lungmask back-end: plumbing only (no download; random weights of lungmask's own network) ---


def test_missing_lungmask_weights_name_the_exact_path(tmp_path: Path, monkeypatch):
    import torch

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "_hub_dir", None, raising=False)
    expected = tmp_path / "hub" / "checkpoints" / "unet_r231-d5d2fc3d.pth"
    image = _ct(np.full((2, 64, 64), -1000.0, np.float32), (5.0, 1.0, 1.0))
    with pytest.raises(FileNotFoundError) as info:
        lung_mask(image, "lungmask")
    assert str(expected) in str(info.value) and "https://github.com/JoHof/lungmask" in str(info.value)
    assert not expected.parent.exists() or not any(expected.parent.iterdir())  # nothing downloaded
    assert available_lung_backends() == ["classical"] and default_lung_backend() == "classical"
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        lung_mask(image, "lungmask", lungmask_weights=str(tmp_path / "nope.pth"))


def test_lungmask_back_end_runs_with_a_local_random_state_dict(tmp_path: Path, monkeypatch):
    import torch
    from lungmask.resunet import UNet

    torch.manual_seed(0)
    net = UNet(n_classes=3, padding=True, depth=5, up_mode="upsample", batch_norm=True, residual=False)
    weights = tmp_path / "lm_random.pth"
    torch.save(net.state_dict(), weights)
    p = make_phantom(1, (8, 64, 64))
    image = _ct(p.hu[3:5], p.spacing)  # two slices: ~1 s each at lungmask's 256x256 on 2 cores
    mask = lung_mask(image, "lungmask", lungmask_weights=str(weights))
    assert mask.shape == (2, 64, 64) and mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 1, 2}
    # the weights found in the torch hub cache are used too, and make lungmask the default back-end
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None, raising=False)
    cached = tmp_path / "home" / "hub" / "checkpoints" / "unet_r231-d5d2fc3d.pth"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(weights.read_bytes())
    assert default_lung_backend() == "lungmask" and "lungmask" in available_lung_backends()
    # R231CovidWeb (trained with COVID-19 lesions inside the lungs) is preferred once its weights are there
    from plsynth.data.lungs import default_lungmask_model
    from plsynth.deploy.predictor import resolve_lung_backend

    assert default_lungmask_model() == "R231"
    (cached.parent / "unet_r231covid-0de78a7e.pth").write_bytes(weights.read_bytes())
    assert default_lungmask_model() == "R231CovidWeb"
    assert resolve_lung_backend("auto")[0] == "lungmask"


def test_lungmask_labels_are_remapped_when_the_network_answers(tmp_path: Path, monkeypatch):
    import lungmask

    fake = np.zeros((1, 8, 8), dtype=np.uint8)
    fake[0, :, :3] = 1  # lungmask: right lung (image left)
    fake[0, :, 5:] = 2  # lungmask: left lung (image right)

    class FakeInferer:  # stands in for the network only; resolution of weights and remap are real
        def __init__(self, **kwargs):
            self.kwargs = kwargs

        def apply(self, array):
            return fake.copy()

    monkeypatch.setattr(lungmask, "LMInferer", FakeInferer)
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"x")
    mask = lung_mask(_ct(np.zeros((1, 8, 8), np.float32), (1.0, 1.0, 1.0)), "lungmask", lungmask_weights=str(weights))
    assert np.all(mask[0, :, 5:] == 1) and np.all(mask[0, :, :3] == 2) and np.all(mask[0, :, 3:5] == 0)


def test_lungmask_refuses_8bit_slices_and_unknown_back_ends_are_errors(tmp_path: Path):
    grey = CTImage(array=np.zeros((1, 16, 16), np.float32), kind="uint8", spacing=None, source=Path("a.png"))
    with pytest.raises(InputError, match="HU"):
        lung_mask(grey, "lungmask", lungmask_weights=str(tmp_path / "w.pth"))
    with pytest.raises(ValueError, match="unknown lung backend"):
        lung_mask(grey, "magic")


def test_near_black_lungs_touching_a_tight_crop_are_not_taken_for_outside_air():
    # Some of COVID-SemiSeg's unlabeled slices are windowed so dark that aerated lung is grey 5-20
    # (as dark as export padding) and cropped so tightly that the lungs touch the image edge. Outside
    # air is flat; lung encloses vessels. Black padding beside the chest must still go.
    p = make_phantom(5, (16, 160, 144))
    z = int(np.argmax((p.lung > 0).sum(axis=(1, 2))))
    grey = np.rint(np.clip((p.hu[z] + 880.0) / 1300.0, 0, 1) * 255).astype(np.float32)
    rows, cols = np.nonzero(p.lung[z])
    box = (slice(rows.min() + 2, rows.max() - 1), slice(cols.min() + 2, cols.max() - 1))
    crop, truth = grey[box], p.lung[z][box] > 0
    assert np.median(crop[truth]) < 12  # the lung really is as dark as padding
    pad = 12
    padded = np.pad(crop, ((0, 0), (0, pad)))  # black export padding on the right
    truth = np.pad(truth, ((0, 0), (0, pad)))
    mask = lung_mask(CTImage(array=padded[None], kind="uint8", spacing=None, source=Path("dark.jpg")))[0]
    # 0.40 when every dark edge-touching region was air; the phantom's lung is patchier than real
    # lung around grey 12 and poorer in vessels, so vessel-poor patches at the edge still go
    assert dice(mask > 0, truth) >= 0.8
    assert not mask[:, -pad:].any()


@pytest.mark.parametrize("name", ["Data-1_coronacases_org_007_88", "Data-1_coronacases_org_005_150"])
def test_dark_unlabeled_covid_semiseg_slices_keep_their_lungs(semiseg_root: Path, name: str):
    # lungs at grey 11-15 touching the crop edge: before, most of them were removed as outside air
    # (lung 6-11 % of the slice, the mediastinum and aorta taken for lung); both lungs fill ~55 %
    from PIL import Image

    path = semiseg_root / "unlabeled" / "images" / f"{name}.jpg"
    grey = np.asarray(Image.open(path).convert("L"), dtype=np.float32)
    mask = lung_mask(CTImage(array=grey[None], kind="uint8", spacing=None, source=path))[0]
    assert (mask > 0).mean() > 0.4
    assert (mask == 1).sum() > 0.15 * mask.size and (mask == 2).sum() > 0.15 * mask.size
