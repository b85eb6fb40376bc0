"""Datasets: layouts, splits by volume, split files, the item contract, lung-less slices, the slice cache."""

from __future__ import annotations

import os
import pickle
import tracemalloc
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy import ndimage
from torch.utils.data import default_collate

from plsynth.config import Config, DataConfig
from plsynth.data import slice_cache
from plsynth.data.datasets import SliceDataset, build_cases, build_splits
from plsynth.data.layouts import find_covid19_20, find_mosmed, find_semiseg
from plsynth.data.phantom import make_phantom
from plsynth.data.splits import check_disjoint, read_slice_list, read_volume_list, split_by_volume
from plsynth.errors import InputError

SIZE = 32
SHAPE = (10, 64, 64)


def _cfg(**data) -> Config:
    base = {"image_size": SIZE, "phantom_shape": SHAPE, "phantom_n": 5, "val_fraction": 0.2, "labeled_fraction": 0.5}
    return Config(data=DataConfig(**{**base, **data}))


def _write_nifti(array_zyx: np.ndarray, spacing: tuple[float, float, float], path: Path, dtype) -> None:
    # (z, y, x) LPS -> NIfTI (i, j, k) with an affine to RAS: x toward left and y toward posterior are -R, -A.
    affine = np.diag([-spacing[2], -spacing[1], spacing[0], 1.0])
    nib.save(nib.Nifti1Image(np.asarray(array_zyx).transpose(2, 1, 0).astype(dtype), affine), path)


def _write_cases(root: Path, n: int, *, lungless: tuple[int, ...] = (), seg: bool = True, seed: int = 0) -> list[str]:
    """COVID-19-20 layout volumes from phantoms; slices in ``lungless`` get their air filled with soft tissue."""
    root.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(n):
        p = make_phantom(seed + i, SHAPE, lesions=True)
        hu, infection = p.hu.copy(), p.infection.copy()
        for z in lungless:
            body = ndimage.binary_fill_holes(hu[z] > -500)
            hu[z][body & (hu[z] < -300)] = 40.0  # no air inside the body: no lung on this slice
            infection[z] = 0
        name = f"volume-covid19-A-{i:04d}"
        _write_nifti(hu, p.spacing, root / f"{name}_ct.nii.gz", np.int16)
        if seg:
            _write_nifti(infection, p.spacing, root / f"{name}_seg.nii.gz", np.uint8)
        names.append(name)
    return names


def _write_csv(path: Path, header: str, rows: list) -> Path:
    path.write_text(header + "\n" + "".join(",".join(str(c) for c in (r if isinstance(r, tuple) else (r,))) + "\n" for r in rows))
    return path


# ------------------------------------------------------------------------- splits and layouts


def test_split_by_volume_is_seeded_disjoint_and_keeps_every_volume():
    names = [f"v{i:02d}" for i in range(10)]
    a = split_by_volume(names, 0.2, 0.3, seed=0)
    assert split_by_volume(list(reversed(names)), 0.2, 0.3, seed=0) == a  # order of discovery does not matter
    assert len(a.val) == 2 and len(a.labeled) == round(0.3 * 8) and len(a.unlabeled) == 8 - len(a.labeled)
    assert sorted(a.labeled + a.unlabeled + a.val) == names
    check_disjoint(labeled=a.labeled, unlabeled=a.unlabeled, val=a.val)
    assert split_by_volume(names, 0.2, 0.3, seed=1) != a
    with pytest.raises(ValueError, match="both"):
        check_disjoint(labeled=["v1"], val=["v1"])


def test_split_file_readers_parse_rows_and_reject_bad_files(tmp_path):
    slices = _write_csv(tmp_path / "l.csv", "volume,slice", [("a", 3), ("b", 0), ("a", 2)])
    assert read_slice_list(slices) == {"a": [2, 3], "b": [0]}
    assert read_volume_list(_write_csv(tmp_path / "v.csv", "volume", ["b", "a"])) == ["b", "a"]
    with pytest.raises(InputError, match="header"):
        read_slice_list(_write_csv(tmp_path / "bad.csv", "FILENAME", ["a_0001.png"]))
    with pytest.raises(InputError, match="line 2"):
        read_slice_list(_write_csv(tmp_path / "bad2.csv", "volume,slice", [("a", "x")]))
    with pytest.raises(InputError, match="more than once"):
        read_volume_list(_write_csv(tmp_path / "dup.csv", "volume", ["a", "a"]))


def test_paper_split_files_have_the_published_counts_and_no_volume_on_two_sides():
    from plsynth.data.splits import splits_folder

    c = splits_folder("covid19-20")  # the copies shipped in the package
    test = read_volume_list(c / "test_volume.csv")
    val = read_volume_list(c / "val_volume.csv")
    assert (len(val), len(test)) == (19, 50)
    assert sorted(read_slice_list(c / "val_slice.csv")) == sorted(val)
    previous: set[str] = set()
    for fraction, n_labeled in (("0.1", 18), ("0.2", 36), ("0.3", 54)):
        lab = read_slice_list(c / f"train_{fraction}_l.csv")
        unl = read_slice_list(c / f"train_{fraction}_u.csv")
        assert len(lab) == n_labeled and len(lab) + len(unl) == 180
        check_disjoint(labeled=list(lab), unlabeled=list(unl), val=val, test=test)
        assert previous <= set(lab)  # labeled subsets are nested
        previous = set(lab)
    assert sum(map(len, read_slice_list(c / "train_0.1_l.csv").values())) == 1194
    m = splits_folder("mosmeddata")
    lab, unl = read_slice_list(m / "train_slice_label.csv"), read_slice_list(m / "train_slice_unlabel.csv")
    val, test = read_volume_list(m / "val_volume.csv"), read_volume_list(m / "test_volume.csv")
    assert (len(lab), len(unl), len(val), len(test)) == (40, 1060, 10, 32)
    assert sum(map(len, lab.values())) == 1356
    check_disjoint(labeled=list(lab), unlabeled=list(unl), val=val, test=test)
    # Validation volumes are listed whole: every slice from 0, contiguous.
    for slices in read_slice_list(m / "val_slice.csv").values():
        assert slices == list(range(len(slices)))


def test_layout_finders_pair_images_with_masks(tmp_path):
    _write_cases(tmp_path / "c20" / "Train", 2)
    (tmp_path / "c20" / "Train" / ".tmp-1234-volume-x_ct.nii.gz").write_bytes(b"partial")
    records = find_covid19_20(tmp_path / "c20")
    assert [r.name for r in records] == ["volume-covid19-A-0000", "volume-covid19-A-0001"]
    assert all(r.label is not None and r.label.name == f"{r.name}_seg.nii.gz" for r in records)

    mos = tmp_path / "COVID19_1110"
    for sub, name in (("studies/CT-1", "study_0255.nii.gz"), ("studies/CT-0", "study_0001.nii.gz"), ("masks", "study_0255_mask.nii.gz")):
        (mos / sub).mkdir(parents=True, exist_ok=True)
        _write_nifti(np.zeros((8, 8, 8)), (1.0, 1.0, 1.0), mos / sub / name, np.int16)
    found = {r.name: r.label for r in find_mosmed(mos)}
    assert set(found) == {"study_0001", "study_0255"}
    assert found["study_0001"] is None and found["study_0255"].name == "study_0255_mask.nii.gz"

    semi = tmp_path / "semi"
    (semi / "labeled" / "images").mkdir(parents=True)
    (semi / "labeled" / "masks").mkdir(parents=True)
    (semi / "labeled" / "images" / "a.jpg").write_bytes(b"x")
    with pytest.raises(InputError, match="without a mask"):
        find_semiseg(semi)


# ------------------------------------------------------------------------------- build_splits


def test_phantom_layout_splits_by_volume_and_items_follow_the_contract(tmp_path):
    cfg = _cfg(layout="phantom")
    splits = build_splits(cfg, tmp_path)
    vols = splits.info["volumes"]
    assert len(vols["val"]) == 1 and len(vols["labeled"]) == 2 and len(vols["unlabeled"]) == 2
    check_disjoint(**vols)
    assert sorted(vols["labeled"] + vols["unlabeled"] + vols["val"]) == [f"phantom-{i:03d}" for i in range(5)]
    assert len(splits.labeled) > 0 and len(splits.unlabeled) > 0

    item = splits.labeled[len(splits.labeled) - 1]
    assert item["image"].shape == (1, SIZE, SIZE) and item["image"].dtype == torch.float32
    assert 0.0 <= float(item["image"].min()) and float(item["image"].max()) <= 1.0
    assert item["lung"].shape == (SIZE, SIZE) and item["lung"].dtype == torch.int64
    assert set(item["lung"].unique().tolist()) <= {0, 1, 2}
    assert item["label"].shape == (1, SIZE, SIZE) and item["label"].dtype == torch.float32
    assert set(item["label"].unique().tolist()) <= {0.0, 1.0}
    assert item["case"] in vols["labeled"] and isinstance(item["index"], int)
    u = splits.unlabeled[0]
    assert "label" not in u and u["case"] in vols["unlabeled"]
    # Labels really are infection masks, somewhere in the labeled set.
    assert any(float(splits.labeled[i]["label"].sum()) > 0 for i in range(len(splits.labeled)))

    batch = default_collate([splits.labeled[i] for i in range(3)])
    assert batch["image"].shape == (3, 1, SIZE, SIZE) and batch["lung"].shape == (3, SIZE, SIZE)

    case = splits.val[0]
    z = SHAPE[0]
    assert case.image.shape == (z, 1, SIZE, SIZE) and case.image.dtype == np.float32
    assert case.lung.shape == case.label.shape == (z, SIZE, SIZE) and case.label.dtype == np.uint8
    assert isinstance(case.image, np.memmap)  # validation volumes are not held in RAM either
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # wrapping for a forward pass must not warn (copy-on-write maps)
        torch.as_tensor(case.image)
    phantom_spacing = make_phantom(0, SHAPE).spacing  # same fov rule: in-plane spacing scales by 64 / 32
    assert case.spacing[0] > 0 and case.spacing[1] == pytest.approx(case.spacing[2])
    assert case.spacing[1] > phantom_spacing[1] * 1.5  # 64 -> 32 pixels: about twice the source spacing


def test_training_skips_slices_without_lung_and_validation_keeps_them(tmp_path):
    root = tmp_path / "data"
    _write_cases(root, 3, lungless=(0, 1))
    splits = build_splits(_cfg(layout="covid19-20", root=str(root), val_fraction=0.34, labeled_fraction=0.5), tmp_path / "run")
    indices = {(splits.labeled[i]["case"], splits.labeled[i]["index"]) for i in range(len(splits.labeled))}
    indices |= {(splits.unlabeled[i]["case"], splits.unlabeled[i]["index"]) for i in range(len(splits.unlabeled))}
    assert indices and not any(z in (0, 1) for _, z in indices)
    assert splits.info["skipped_without_lung"] >= 2 * 2
    (case,) = splits.val
    assert case.image.shape[0] == SHAPE[0]  # validation volumes keep every slice
    assert int(np.asarray(case.lung[:2]).sum()) == 0 and int(np.asarray(case.lung[2:]).sum()) > 0

    keep = build_splits(_cfg(layout="covid19-20", root=str(root), val_fraction=0.34, skip_slices_without_lung=False), tmp_path / "run")
    assert len(keep.labeled) + len(keep.unlabeled) == 2 * SHAPE[0]


def test_split_files_choose_the_volumes_and_slices(tmp_path):
    root = tmp_path / "data"
    names = _write_cases(root, 4)
    splits_dir = tmp_path / "splits"
    splits_dir.mkdir()
    _write_csv(splits_dir / "l.csv", "volume,slice", [(names[0], 3), (names[0], 4), (names[1], 5)])
    _write_csv(splits_dir / "u.csv", "volume,slice", [(names[2], 2), (names[2], 6)])
    _write_csv(splits_dir / "val.csv", "volume", [names[3]])
    cfg = _cfg(layout="covid19-20", root=str(root), splits_dir=str(splits_dir), labeled_split="l.csv", unlabeled_split="u.csv", val_split="val.csv")
    splits = build_splits(cfg, tmp_path / "run")
    assert [(splits.labeled[i]["case"], splits.labeled[i]["index"]) for i in range(len(splits.labeled))] == [
        (names[0], 3), (names[0], 4), (names[1], 5)
    ]
    assert [splits.unlabeled[i]["index"] for i in range(len(splits.unlabeled))] == [2, 6]
    assert [c.name for c in splits.val] == [names[3]] and splits.val[0].image.shape[0] == SHAPE[0]
    assert splits.test is None  # no test list in this config

    # A held-out volume list (the paper's test_volume.csv) is prepared like validation, from the same cache.
    (test_case,) = build_cases(cfg, tmp_path / "run", _write_csv(splits_dir / "test.csv", "volume", [names[3]]))
    np.testing.assert_array_equal(test_case.image, splits.val[0].image)
    assert test_case.spacing == splits.val[0].spacing

    _write_csv(splits_dir / "leak.csv", "volume", [names[0]])
    with pytest.raises(ValueError, match="both"):
        build_splits(cfg.replace(data=DataConfig(**{**cfg.data.__dict__, "val_split": "leak.csv"})), tmp_path / "run")
    _write_csv(splits_dir / "missing.csv", "volume", ["volume-covid19-A-0999"])
    with pytest.raises(InputError, match="not found"):
        build_splits(cfg.replace(data=DataConfig(**{**cfg.data.__dict__, "val_split": "missing.csv"})), tmp_path / "run")


def test_folder_layout_is_unlabeled_only(tmp_path):
    _write_cases(tmp_path / "vols", 1, seg=False)
    splits = build_splits(_cfg(layout="folder", root=str(tmp_path / "vols")), tmp_path / "run")
    assert len(splits.labeled) == 0 and not splits.val and len(splits.unlabeled) > 0
    assert splits.info["volumes"]["unlabeled"] == ["volume-covid19-A-0000_ct"]


# ------------------------------------------------------------------------------------ the cache


def test_second_build_reuses_the_cache_and_an_edited_file_is_prepared_again(tmp_path, monkeypatch):
    root = tmp_path / "data"
    names = _write_cases(root, 3)
    cfg = _cfg(layout="covid19-20", root=str(root), val_fraction=0.34)
    calls: list[str] = []
    real = slice_cache.prepare_volume
    monkeypatch.setattr(slice_cache, "prepare_volume", lambda record, data: calls.append(record.name) or real(record, data))

    first = build_splits(cfg, tmp_path / "run")
    assert sorted(calls) == names
    npy = sorted((tmp_path / "run" / "cache").rglob("*.npy"))
    mtimes = [p.stat().st_mtime_ns for p in npy]
    calls.clear()
    second = build_splits(cfg, tmp_path / "run")
    assert calls == [] and second.info["reused"] == 3
    assert [p.stat().st_mtime_ns for p in npy] == mtimes
    np.testing.assert_array_equal(second.labeled[0]["image"], first.labeled[0]["image"])

    ct = root / f"{names[0]}_ct.nii.gz"
    os.utime(ct, ns=(ct.stat().st_atime_ns, ct.stat().st_mtime_ns + 10**9))
    build_splits(cfg, tmp_path / "run")
    assert calls == [names[0]]
    # A preprocessing change (size) gets its own cache folder.
    calls.clear()
    build_splits(cfg.replace(data=DataConfig(**{**cfg.data.__dict__, "image_size": 48})), tmp_path / "run")
    assert sorted(calls) == names and len(list((tmp_path / "run" / "cache").iterdir())) == 2


def test_datasets_hold_memmaps_not_volumes_so_memory_stays_flat(tmp_path):
    root = tmp_path / "data"
    _write_cases(root, 1)
    size = 128  # large enough that a volume (10 x 128 x 128 float32, 640 kB) dwarfs per-volume bookkeeping
    cfg = _cfg(layout="covid19-20", root=str(root), val_fraction=0.0, image_size=size)
    volume = slice_cache.SliceCache(tmp_path / "cache", cfg.data).get(find_covid19_20(root)[0])
    assert isinstance(volume.open("image"), np.memmap)
    one_volume_bytes = volume.n_slices * size * size * 4

    def resident(n: int) -> int:
        tracemalloc.start()
        ds = SliceDataset([volume] * n, [np.arange(volume.n_slices)] * n, labeled=True)
        for i in range(len(ds)):
            ds[i]
        current, _ = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert all(isinstance(a, (np.memmap, type(None))) for arrays in ds._open.values() for a in arrays)
        return current

    small, large = resident(3), resident(30)
    # Holding the 27 extra volumes in RAM would cost 27 x one_volume_bytes; allow one volume of slack.
    assert large - small < one_volume_bytes
    # What is pickled to DataLoader workers is small: paths, metadata and the index.
    ds = SliceDataset([volume] * 30, [np.arange(volume.n_slices)] * 30, labeled=True)
    ds[0]
    assert len(pickle.dumps(ds)) < 30 * one_volume_bytes / 10
    clone = pickle.loads(pickle.dumps(ds))
    np.testing.assert_array_equal(clone[5]["image"], ds[5]["image"])


# ------------------------------------------------------------------------------- COVID-SemiSeg


def test_semiseg_layout_on_real_slices(semiseg_root, tmp_path):
    # The 50 labeled slices and 2 of the unlabeled ones, linked (not copied) to keep the test short.
    root = tmp_path / "semiseg"
    (root / "unlabeled" / "images").mkdir(parents=True)
    (root / "labeled").symlink_to(semiseg_root / "labeled", target_is_directory=True)
    for path in sorted((semiseg_root / "unlabeled" / "images").iterdir())[:2]:
        (root / "unlabeled" / "images" / path.name).symlink_to(path)
    splits = build_splits(_cfg(layout="semiseg", root=str(root), image_size=64, val_fraction=0.2), tmp_path / "run")
    assert len(splits.val) == 10 and len(splits.labeled.volumes) == 40
    check_disjoint(**splits.info["volumes"])
    case = splits.val[0]
    assert case.spacing is None and case.image.shape == (1, 1, 64, 64) and case.label.shape == (1, 64, 64)
    assert set(np.unique(np.asarray(case.label)).tolist()) <= {0, 1}
    assert sum(int(np.asarray(c.label).sum()) > 0 for c in splits.val) >= 5  # labeled slices show infection
    item = splits.labeled[0]
    assert item["image"].shape == (1, 64, 64) and item["label"].shape == (1, 64, 64)
    assert len(splits.unlabeled.volumes) == 2
    assert any("both sides" in note for note in splits.info["notes"])
