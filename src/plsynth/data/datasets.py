"""Labeled, unlabeled and validation data of one experiment, from any supported layout.

``build_splits(cfg, out)`` is the path of every slice from disk to the trainer:

1. find the cases of ``cfg.data.layout`` (``plsynth.data.layouts``);
2. assign them to labeled / unlabeled / validation, **by volume** (``plsynth.data.splits``):
   from the paper's split files when ``cfg.data.labeled_split`` is given, else by a seeded
   shuffle of the labeled volumes (``val_fraction`` to validation, ``labeled_fraction`` of the
   rest labeled, the others unlabeled with their labels dropped);
3. prepare each volume once into the on-disk cache (``plsynth.data.slice_cache``: window,
   lung mask, ``to_model_input``), the same for training and validation;
4. index ``(volume, slice)`` pairs; training sets skip slices without lung
   (``skip_slices_without_lung``, as the paper's split files do), validation volumes keep all.

Datasets hold only paths, small metadata and an index; slices are read lazily from memory maps,
so a thousand volumes cost a few MB of RAM.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from plsynth.config import Config
from plsynth.data.layouts import VolumeRecord, dataset_root, find_folder, find_semiseg, find_slices, find_volumes
from plsynth.data.slice_cache import CachedVolume, SliceCache
from plsynth.data.splits import carve_items, check_disjoint, read_slice_list, read_volume_list, split_by_volume, splits_folder
from plsynth.errors import InputError

log = logging.getLogger(__name__)

OPEN_VOLUMES = 8  # memmapped volumes a dataset keeps open (bounds file handles, not memory)


class SliceDataset(Dataset):
    """Training slices of cached volumes, read lazily.

    Item (the project's contract): ``image`` float32 ``(1, S, S)`` in [0, 1], ``lung`` int64
    ``(S, S)`` in {0, 1, 2}, ``label`` float32 ``(1, S, S)`` in {0, 1} (labeled sets only),
    ``case`` (volume name) and ``index`` (slice index ``z`` in that volume).
    """

    def __init__(self, volumes: Sequence[CachedVolume], slices: Sequence[Sequence[int]], labeled: bool) -> None:
        if len(volumes) != len(slices):
            raise ValueError(f"{len(volumes)} volumes but {len(slices)} slice lists")
        self.volumes = list(volumes)
        self.labeled = labeled
        rows = []
        for v, (volume, indices) in enumerate(zip(self.volumes, slices)):
            indices = np.asarray(indices, dtype=np.int64).reshape(-1)
            if indices.size and (indices.min() < 0 or indices.max() >= volume.n_slices):
                raise ValueError(f"{volume.name}: slice index out of range 0..{volume.n_slices - 1}")
            if labeled and not volume.has_label:
                raise ValueError(f"{volume.name}: labeled dataset given a volume without a label")
            rows.append(np.stack([np.full(indices.size, v, dtype=np.int64), indices], axis=1))
        self.index = np.concatenate(rows).astype(np.int32) if rows else np.zeros((0, 2), np.int32)
        self._open: OrderedDict[int, tuple[np.ndarray, ...]] = OrderedDict()

    def __len__(self) -> int:
        return int(self.index.shape[0])

    @property
    def cases(self) -> list[str]:
        """Names of the volumes assigned to this set (also those left with no slice after skipping)."""
        return [volume.name for volume in self.volumes]

    def _arrays(self, v: int) -> tuple[np.ndarray, ...]:
        if v in self._open:
            self._open.move_to_end(v)
            return self._open[v]
        volume = self.volumes[v]
        arrays = (volume.open("image"), volume.open("lung"), volume.open("label") if self.labeled else None)
        self._open[v] = arrays
        if len(self._open) > OPEN_VOLUMES:
            self._open.popitem(last=False)
        return arrays

    def __getitem__(self, i: int) -> dict[str, Any]:
        v, z = (int(t) for t in self.index[i])
        image, lung, label = self._arrays(v)
        item: dict[str, Any] = {
            "image": torch.from_numpy(np.array(image[z], dtype=np.float32)),
            "lung": torch.from_numpy(np.array(lung[z], dtype=np.int64)),
            "case": self.volumes[v].name,
            "index": z,
        }
        if label is not None:
            item["label"] = torch.from_numpy(np.array(label[z], dtype=np.float32)[None])
        return item

    def __getstate__(self) -> dict[str, Any]:
        # DataLoader workers and Ray get paths and the index; each process opens its own memmaps.
        state = self.__dict__.copy()
        state["_open"] = OrderedDict()
        return state


@dataclass(frozen=True)
class ValCase:
    """One validation (or test) case, prepared exactly as training slices.

    ``image`` (Z, 1, S, S) float32, ``lung`` (Z, S, S) uint8, ``label`` (Z, S, S) uint8
    (copy-on-write memmaps: nothing is read into RAM until used); ``spacing`` (z, y*, x*) mm of the prepared grid, or None for 2D slices (metrics then
    use pixels).
    """

    name: str
    image: np.ndarray
    lung: np.ndarray
    label: np.ndarray
    spacing: tuple[float, float, float] | None


@dataclass
class DataSplits:
    """What ``build_splits`` returns; ``info`` records where everything came from (goes into run logs).

    ``test`` is None unless the config names a test volume list (``data.test_split``, where the
    schema has it); it is prepared on first access only, so training runs never pay for it.
    """

    labeled: SliceDataset
    unlabeled: SliceDataset
    val: list[ValCase]
    info: dict[str, Any] = field(default_factory=dict)
    test_loader: Callable[[], list[ValCase]] | None = field(default=None, repr=False)
    _test: list[ValCase] | None = field(default=None, repr=False)

    @property
    def test(self) -> list[ValCase] | None:
        if self._test is None and self.test_loader is not None:
            self._test = self.test_loader()
        return self._test


def _val_case(volume: CachedVolume) -> ValCase:
    if not volume.has_label:
        raise ValueError(f"{volume.source}: a validation case needs an infection mask")
    # Copy-on-write memmaps: torch.as_tensor wraps them without copying or warning; the cache is never written.
    return ValCase(volume.name, volume.open("image", "c"), volume.open("lung", "c"), volume.open("label", "c"), volume.spacing)


def _training_slices(volume: CachedVolume, skip_without_lung: bool) -> np.ndarray:
    if skip_without_lung:
        return np.flatnonzero(volume.lung_any)
    return np.arange(volume.n_slices)


def _split_seed(cfg: Config) -> int:
    # A split must not change with the training seed (runs with several seeds share one split).
    return cfg.data.split_seed


def _prepare(cache: SliceCache, records: Sequence[VolumeRecord], role: str) -> list[CachedVolume]:
    out = []
    for i, record in enumerate(records, start=1):
        out.append(cache.get(record))
        if i % 50 == 0 or i == len(records):
            log.info("%s: %d/%d volumes ready (%d prepared, %d from cache)", role, i, len(records), cache.prepared, cache.reused)
    return out


def _split_file(splits_dir: str, name: str) -> Path:
    folder = splits_folder(splits_dir)
    return folder / name if folder else Path(name)


def _split_files(cfg: Config) -> dict[str, Path]:
    data = cfg.data
    files = {}
    for key in ("labeled_split", "unlabeled_split", "val_split"):
        name = getattr(data, key)
        if name:
            path = _split_file(data.splits_dir, name)
            if not path.is_file():
                raise InputError(path, f"data.{key} not found (data.splits_dir={data.splits_dir!r})")
            files[key] = path
    if files and "labeled_split" not in files:
        raise ValueError(f"{cfg.source or 'config'}: data.labeled_split is required when other split files are given")
    return files


def _records_by_name(records: Sequence[VolumeRecord], names: Sequence[str], where: Path, need_label: bool) -> list[VolumeRecord]:
    by_name = {r.name: r for r in records}
    missing = [n for n in names if n not in by_name]
    if missing:
        raise InputError(where, f"{len(missing)} volume(s) not found under data.root, e.g. {missing[0]!r}")
    out = [by_name[n] for n in names]
    unlabeled = [r.name for r in out if need_label and r.label is None]
    if unlabeled:
        raise InputError(where, f"{len(unlabeled)} volume(s) listed here have no infection mask, e.g. {unlabeled[0]!r}")
    return out


def build_splits(cfg: Config, out: Path) -> DataSplits:
    """Labeled, unlabeled and validation data of ``cfg`` (see the module docstring).

    ``out`` is the run folder: phantoms are generated into ``out/data`` and the slice cache
    lives in ``cfg.data.cache_dir`` or ``out/cache``.
    """
    data = cfg.data
    out = Path(out)
    cache = SliceCache(Path(data.cache_dir) if data.cache_dir else out / "cache", data)
    info: dict[str, Any] = {"layout": data.layout, "cache": str(cache.folder), "notes": []}
    if data.layout == "semiseg":
        splits = _build_semiseg(cfg, cache, info)
    else:
        splits = _build_volumes(cfg, out, cache, info)
    info["volumes"] = {
        "labeled": splits.labeled.cases,
        "unlabeled": splits.unlabeled.cases,
        "val": [c.name for c in splits.val],
    }
    info["slices"] = {
        "labeled": len(splits.labeled),
        "unlabeled": len(splits.unlabeled),
        "val": int(sum(c.image.shape[0] for c in splits.val)),
    }
    info["prepared"], info["reused"] = cache.prepared, cache.reused
    check_disjoint(**info["volumes"])
    test_split = data.test_split
    if test_split and data.layout != "semiseg":
        test_file = _split_file(data.splits_dir, test_split)
        test_names = read_volume_list(test_file)
        check_disjoint(training=info["volumes"]["labeled"] + info["volumes"]["unlabeled"] + info["volumes"]["val"], test=test_names)
        info["test_split"] = str(test_file)
        splits.test_loader = lambda: build_cases(cfg, out, test_file)
    log.info(
        "data %s: %d labeled slices (%d volumes), %d unlabeled slices (%d volumes), %d val cases",
        data.layout, len(splits.labeled), len(info["volumes"]["labeled"]), len(splits.unlabeled),
        len(info["volumes"]["unlabeled"]), len(splits.val),
    )
    return splits


def build_cases(cfg: Config, out: Path, volume_list: str | Path) -> list[ValCase]:
    """Evaluation cases for the volumes named in ``volume_list`` (a ``volume`` CSV, e.g. the paper's
    ``test_volume.csv``), found in ``cfg.data.root`` with ``cfg.data.layout`` and prepared exactly as
    validation volumes (same cache). Every listed volume must exist and have an infection mask.
    """
    data = cfg.data
    out = Path(out)
    if data.layout == "semiseg":
        raise ValueError("build_cases needs a volume layout; COVID-SemiSeg has no volumes (its test split is not here)")
    root = out / "data" if data.layout == "phantom" and not data.root else dataset_root(data.layout, data.root)
    cache = SliceCache(Path(data.cache_dir) if data.cache_dir else out / "cache", data)
    names = read_volume_list(volume_list)
    records = _records_by_name(find_volumes(data.layout, root), names, Path(volume_list), need_label=True)
    return [_val_case(v) for v in _prepare(cache, records, "test")]


def _extra_unlabeled(cfg: Config) -> list[VolumeRecord]:
    if not cfg.data.unlabeled_root:
        return []
    return [VolumeRecord(r.name, r.image, None) for r in find_folder(cfg.data.unlabeled_root)]


def _build_volumes(cfg: Config, out: Path, cache: SliceCache, info: dict[str, Any]) -> DataSplits:
    data = cfg.data
    if data.layout == "phantom":
        from plsynth.data.phantom import write_phantom_dataset

        root = Path(data.root) if data.root else out / "data"
        write_phantom_dataset(root, data.phantom_n, data.phantom_seed, tuple(data.phantom_shape))
        info["notes"].append("phantoms: lungs from lung_mask(), not from the phantoms' true *_lung files")
    else:
        root = dataset_root(data.layout, data.root)
    records = find_volumes(data.layout, root)
    extra = _extra_unlabeled(cfg)
    info["root"] = str(root)
    skip = data.skip_slices_without_lung
    files = _split_files(cfg)

    if files:
        info["split"] = {k: str(v) for k, v in files.items()}
        labeled_slices = read_slice_list(files["labeled_split"])
        unlabeled_slices = read_slice_list(files["unlabeled_split"]) if "unlabeled_split" in files else None
        if "val_split" in files:
            val_names = read_volume_list(files["val_split"])
            lab_names = list(labeled_slices)
        else:
            lab_names, val_names = carve_items(list(labeled_slices), data.val_fraction, _split_seed(cfg))
        if unlabeled_slices is None:
            taken = set(lab_names) | set(val_names) | set(labeled_slices)
            unl_names = [r.name for r in records if r.name not in taken]
        else:
            unl_names = list(unlabeled_slices)
        check_disjoint(labeled=lab_names, unlabeled=unl_names, val=val_names)
        lab_records = _records_by_name(records, lab_names, files["labeled_split"], need_label=True)
        val_records = _records_by_name(records, val_names, files.get("val_split", files["labeled_split"]), need_label=True)
        unl_records = _records_by_name(records + extra, unl_names, files.get("unlabeled_split", Path(root)), need_label=False)
        unl_records += [r for r in extra if r.name not in set(unl_names)]
        labeled = _prepare(cache, lab_records, "labeled")
        unlabeled = _prepare(cache, unl_records, "unlabeled")
        lab_idx = [labeled_slices[v.name] for v in labeled]
        unl_idx = [
            unlabeled_slices[v.name] if unlabeled_slices is not None and v.name in unlabeled_slices else _training_slices(v, skip)
            for v in unlabeled
        ]
        for volume, idx in zip(labeled, lab_idx):
            if idx and max(idx) >= volume.n_slices:
                raise InputError(files["labeled_split"], f"{volume.name}: slice {max(idx)} listed, volume has {volume.n_slices}")
        info["notes"].append("training slices as listed in the split files (their lung-less slices were dropped by the authors)")
    else:
        with_label = [r for r in records if r.label is not None]
        without = [r for r in records if r.label is None] + extra
        if data.layout == "folder" or not with_label:
            lab_records, val_records, unl_records = [], [], list(without)
            info["notes"].append("no labeled volumes: unlabeled data only")
        else:
            split = split_by_volume([r.name for r in with_label], data.val_fraction, data.labeled_fraction, _split_seed(cfg))
            by_name = {r.name: r for r in with_label}
            lab_records = [by_name[n] for n in split.labeled]
            val_records = [by_name[n] for n in split.val]
            unl_records = [by_name[n] for n in split.unlabeled] + without
            info["split"] = {"seed": _split_seed(cfg), "val_fraction": data.val_fraction, "labeled_fraction": data.labeled_fraction}
        check_disjoint(
            labeled=[r.name for r in lab_records], unlabeled=[r.name for r in unl_records], val=[r.name for r in val_records]
        )
        labeled = _prepare(cache, lab_records, "labeled")
        unlabeled = _prepare(cache, unl_records, "unlabeled")
        lab_idx = [_training_slices(v, skip) for v in labeled]
        unl_idx = [_training_slices(v, skip) for v in unlabeled]
    val = [_val_case(v) for v in _prepare(cache, val_records, "val")]
    if skip:
        info["skipped_without_lung"] = int(
            sum(v.n_slices - len(i) for v, i in zip(labeled + unlabeled, lab_idx + unl_idx))
        )
    return DataSplits(SliceDataset(labeled, lab_idx, labeled=True), SliceDataset(unlabeled, unl_idx, labeled=False), val, info)


def _build_semiseg(cfg: Config, cache: SliceCache, info: dict[str, Any]) -> DataSplits:
    """COVID-SemiSeg: every 8-bit slice is its own case (Z = 1, spacing None).

    The slices carry no patient ids, so the validation carve-out (``val_fraction`` of the
    labeled slices, seeded shuffle) is by slice and **may put slices of one patient on both
    sides**; validation scores are therefore optimistic. Slices without lung are kept in
    validation and skipped in training like any other layout.
    """
    data = cfg.data
    root = dataset_root(data.layout, data.root)
    labeled_records, unlabeled_records = find_semiseg(root)
    if data.unlabeled_root:
        unlabeled_records += [VolumeRecord(s, p, None) for s, p in sorted(find_slices(data.unlabeled_root).items())]
    info["root"] = str(root)
    info["notes"].append("semiseg: validation carved by slice (no patient ids): one patient may be on both sides")
    info["notes"].append("semiseg: no spacing; NSD tolerance is in pixels of the resized slice")
    kept, carved = carve_items([r.name for r in labeled_records], data.val_fraction, _split_seed(cfg))
    by_name = {r.name: r for r in labeled_records}
    info["split"] = {"seed": _split_seed(cfg), "val_fraction": data.val_fraction, "by": "slice"}
    labeled = _prepare(cache, [by_name[n] for n in kept], "labeled")
    unlabeled = _prepare(cache, unlabeled_records, "unlabeled")
    val = [_val_case(v) for v in _prepare(cache, [by_name[n] for n in carved], "val")]
    skip = data.skip_slices_without_lung
    lab_idx = [_training_slices(v, skip) for v in labeled]
    unl_idx = [_training_slices(v, skip) for v in unlabeled]
    info["skipped_without_lung"] = int(sum(v.n_slices - len(i) for v, i in zip(labeled + unlabeled, lab_idx + unl_idx)))
    return DataSplits(SliceDataset(labeled, lab_idx, labeled=True), SliceDataset(unlabeled, unl_idx, labeled=False), val, info)
