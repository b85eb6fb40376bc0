"""What a run writes beside its checkpoints: CSV logs, optional TensorBoard, and a PNG of its curves.

``log.csv``  one row per iteration: step, epoch, lr, loss and its terms.
``val.csv``  one row per validation (every ``train.val_every_iters``): step, epoch, dice, nsd, cases.
``curves.png`` the training loss (and its terms) and the validation Dice / NSD per iteration.

On resume, rows after the resumed step are dropped first: a killed run may have logged
iterations that its last checkpoint does not contain, and those are run again.
TensorBoard event files are written to ``tb/`` only when the ``tensorboard`` package is installed.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path
from typing import Any

from plsynth.atomic import atomic_write

logger = logging.getLogger(__name__)

TRAIN_FIELDS = ["step", "epoch", "lr", "loss", "loss_s", "loss_pseudo", "loss_synthetic", "seconds"]
VAL_FIELDS = ["step", "epoch", "dice", "nsd", "cases"]


def read_rows(path: Path) -> list[dict[str, str]]:
    if not Path(path).is_file():
        return []
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def _truncate(path: Path, fields: list[str], keep_below_step: int) -> None:
    rows = [r for r in read_rows(path) if int(r["step"]) < keep_below_step]
    with atomic_write(path) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


class RunLog:
    """Appends rows to ``out/log.csv`` and ``out/val.csv``; ``start_step`` > 0 means a resumed run."""

    def __init__(self, out: Path, start_step: int = 0) -> None:
        self.out = Path(out)
        self.train_path = self.out / "log.csv"
        self.val_path = self.out / "val.csv"
        # A validation row logged at step s describes the model after s steps, so rows with step
        # <= start_step stay (val.csv uses the number of steps done).
        _truncate(self.train_path, TRAIN_FIELDS, start_step)
        _truncate(self.val_path, VAL_FIELDS, start_step + 1)
        self._train = open(self.train_path, "a", newline="")
        self._val = open(self.val_path, "a", newline="")
        self._train_writer = csv.DictWriter(self._train, fieldnames=TRAIN_FIELDS, extrasaction="ignore")
        self._val_writer = csv.DictWriter(self._val, fieldnames=VAL_FIELDS, extrasaction="ignore")
        self._tb = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.out / "tb"), purge_step=start_step or None)
        except ImportError:
            pass

    def train(self, row: dict[str, Any]) -> None:
        self._train_writer.writerow(row)
        self._train.flush()
        if self._tb is not None:
            for key, value in row.items():
                if key.startswith("loss") or key == "lr":
                    self._tb.add_scalar(f"train/{key}", value, row["step"])

    def val(self, row: dict[str, Any]) -> None:
        self._val_writer.writerow(row)
        self._val.flush()
        if self._tb is not None:
            for key in ("dice", "nsd"):
                self._tb.add_scalar(f"val/{key}", row[key], row["step"])

    def flush(self) -> None:
        self._train.flush()
        self._val.flush()
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        self.flush()
        self._train.close()
        self._val.close()
        if self._tb is not None:
            self._tb.close()


def plot_curves(out: Path, title: str = "") -> Path:
    """Draw ``out/curves.png`` from log.csv and val.csv (matplotlib, no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    train, val = read_rows(out / "log.csv"), read_rows(out / "val.csv")
    fig, (ax_loss, ax_val) = plt.subplots(1, 2, figsize=(11, 4))
    if train:
        steps = [int(r["step"]) for r in train]
        for key in ("loss", "loss_s", "loss_pseudo", "loss_synthetic"):
            values = [float(r[key]) if r.get(key) not in (None, "") else float("nan") for r in train]
            if any(v == v for v in values):
                ax_loss.plot(steps, values, label=key, linewidth=1.0 if key == "loss" else 0.7)
        ax_loss.set_xlabel("iteration")
        ax_loss.set_ylabel("loss (BCE + Dice)")
        ax_loss.legend()
    if val:
        steps = [int(r["step"]) for r in val]
        for key in ("dice", "nsd"):
            ax_val.plot(steps, [float(r[key]) for r in val], marker="o", label=f"val {key}")
        ax_val.set_xlabel("iteration")
        ax_val.set_ylim(0, 1)
        ax_val.legend()
    fig.suptitle(title)
    fig.tight_layout()
    path = out / "curves.png"
    with atomic_write(path) as tmp:
        fig.savefig(tmp, dpi=80, format="png")
    plt.close(fig)
    return path
