"""Split files of the paper and seeded splits by volume.

The paper's splits ship with plsynth (``plsynth/data/paper_splits/<set>/``: ``covid19-20`` and
``mosmeddata``, converted from the authors' xlsx files; a config names a set with
``data.splits_dir: covid19-20``) and come in two kinds of CSV:

- slice lists, header ``volume,slice``: one training (or evaluation) slice per row, the slice
  being the z index of the volume's ``(z, y, x)`` array. The training lists leave out slices
  without lung (their z ranges start after 0), so plsynth takes them as given.
- volume lists, header ``volume``: one volume name per row (validation and test volumes, which
  are evaluated whole).

Volume names are file stems: ``volume-covid19-A-0391`` is ``volume-covid19-A-0391_ct.nii.gz``
in the COVID-19-20 layout, ``study_0255`` is ``study_0255.nii.gz`` in MosMedData.

Without split files, :func:`split_by_volume` splits by volume with a seeded shuffle, so no
slice of one patient lands on both sides of a split.
"""

from __future__ import annotations

import csv
import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from plsynth.errors import InputError

log = logging.getLogger(__name__)


def paper_split_sets() -> list[str]:
    """Names of the split sets shipped in the package (``data.splits_dir: <name>``)."""
    folder = _paper_splits()
    return sorted(p.name for p in folder.iterdir() if p.is_dir())


def _paper_splits() -> Path:
    # A real folder: plsynth is installed unzipped (wheel or editable), so package data are plain files.
    return Path(str(resources.files("plsynth.data") / "paper_splits"))


def splits_folder(splits_dir: str) -> Path | None:
    """The folder ``data.splits_dir`` names: a shipped set by its bare name (``covid19-20``), else a path.

    "" gives None (split file names are then paths of their own). A name with a path separator
    (``./covid19-20``, ``/data/splits``) is always a folder on disk.
    """
    if not splits_dir:
        return None
    if Path(splits_dir).parts == (splits_dir,) and splits_dir in paper_split_sets():
        return _paper_splits() / splits_dir
    return Path(splits_dir).expanduser()


def _rows(path: Path, header: tuple[str, ...]) -> list[list[str]]:
    path = Path(path)
    try:
        with path.open(newline="") as f:
            rows = [[cell.strip() for cell in row] for row in csv.reader(f) if any(cell.strip() for cell in row)]
    except OSError as exc:
        raise InputError(path, f"cannot read split file: {exc}") from exc
    if not rows or tuple(cell.lower() for cell in rows[0]) != header:
        got = rows[0] if rows else "an empty file"
        raise InputError(path, f"expected a CSV with header {','.join(header)!r}, got {got!r}")
    for line, row in enumerate(rows[1:], start=2):
        if len(row) != len(header) or not all(row):
            raise InputError(path, f"line {line}: expected {len(header)} non-empty column(s) {header}, got {row!r}")
    return rows[1:]


def read_slice_list(path: str | Path) -> dict[str, list[int]]:
    """``volume,slice`` rows -> ``{volume: sorted slice indices}``, volumes in file order.

    Raises InputError (naming the file and the line) for a wrong header, a non-integer or
    negative slice index, or a slice listed twice.
    """
    path = Path(path)
    out: dict[str, list[int]] = {}
    for line, (volume, slice_text) in enumerate(_rows(path, ("volume", "slice")), start=2):
        try:
            index = int(slice_text)
        except ValueError:
            raise InputError(path, f"line {line}: slice must be an integer z index, got {slice_text!r}") from None
        if index < 0:
            raise InputError(path, f"line {line}: slice index must be >= 0, got {index}")
        out.setdefault(volume, []).append(index)
    for volume, indices in out.items():
        if len(set(indices)) != len(indices):
            raise InputError(path, f"volume {volume!r} lists a slice more than once")
        indices.sort()
    return out


def read_volume_list(path: str | Path) -> list[str]:
    """``volume`` rows -> volume names in file order (InputError on a wrong header or duplicates)."""
    path = Path(path)
    names = [row[0] for row in _rows(path, ("volume",))]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise InputError(path, f"volume(s) listed more than once: {', '.join(dup[:5])}")
    return names


@dataclass(frozen=True)
class VolumeSplit:
    """Volume names per role; disjoint by construction."""

    labeled: list[str]
    unlabeled: list[str]
    val: list[str]


def split_by_volume(
    labeled_names: Sequence[str],
    val_fraction: float,
    labeled_fraction: float,
    seed: int,
    unlabeled_names: Sequence[str] = (),
) -> VolumeSplit:
    """Seeded split of volumes that have labels (plus any that never had labels).

    ``round(val_fraction * n)`` of the labeled volumes go to validation (at least one when
    ``val_fraction > 0`` and at least two volumes exist); of the rest, ``round(labeled_fraction
    * rest)`` stay labeled (at least one: every method needs labeled data) and the others become
    unlabeled (their labels are dropped). ``unlabeled_names`` join the unlabeled side as they are.
    The same names, fractions and seed give the same split on every machine (names are sorted
    before the shuffle, so file-system order does not matter).
    """
    names = sorted(set(labeled_names))
    if len(names) != len(labeled_names):
        raise ValueError("labeled volume names must be unique")
    if not names:
        raise ValueError("no labeled volumes to split")
    random.Random(seed).shuffle(names)
    n = len(names)
    n_val = round(val_fraction * n)
    if val_fraction > 0 and n >= 2:
        n_val = max(1, n_val)
    n_val = min(n_val, n - 1)
    val, rest = names[:n_val], names[n_val:]
    n_lab = min(len(rest), max(1, round(labeled_fraction * len(rest))))
    extra = [name for name in unlabeled_names if name not in set(names)]
    return VolumeSplit(labeled=sorted(rest[:n_lab]), unlabeled=sorted(rest[n_lab:]) + sorted(extra), val=sorted(val))


def check_disjoint(**groups: Sequence[str]) -> None:
    """Raise ValueError naming both groups and a volume if any volume is in two groups."""
    seen: dict[str, str] = {}
    for group, names in groups.items():
        for name in names:
            if name in seen and seen[name] != group:
                raise ValueError(f"volume {name!r} is in both the {seen[name]} and the {group} split; splits must be by volume")
            seen[name] = group


def carve_items(items: Sequence[str], fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Seeded carve-out of ``round(fraction * n)`` items (at least one when fraction > 0 and n >= 2).

    Returns ``(kept, carved)``, both sorted; the same rule as the validation part of
    :func:`split_by_volume`. Used for layouts without volumes (single slices).
    """
    split = split_by_volume(items, fraction, 1.0, seed)
    return split.labeled, split.val
