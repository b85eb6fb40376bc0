"""The style code pool (paper eq. 8-9) and how a reference style is drawn from it.

Built once from every labeled training slice (un-augmented) with the trained style encoder:
``codes`` (N, C, D), ``present`` (N, C) (C map classes; the class has at least one pixel in the slice's map at
the encoder's feature resolution, i.e. its row is a real mean, not the zero placeholder) and
``has_infection`` (N,) (the slice's ground truth contains infection; the paper's N+).

Drawing (``draw``): one reference code per request batch (paper eq. 9: per mini-batch), the
same for every sample of the batch. K codes are drawn without replacement from the mode's
subset (with fewer than K members, all of them are used, as the official code does), and
averaged **per class over the codes in which that class is present**. Our choice, unlike the
official code (which averages zero rows too): a slice without, say, a right lung should not
pull the right-lung style toward zero; a class present in none of the K codes stays a zero
row, which is what the paper's encoder gives for an absent class.

Modes (paper Fig. 8): ``positive`` = N+ (default), ``all`` = N, ``self`` = the request's own
images encoded under their (pseudo-)label maps, which needs the encoder and so is handled by
``plsynth.synth_service.local.LocalSynthesizer``, not by the pool.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Literal

import numpy as np
import torch

log = logging.getLogger(__name__)

PoolMode = Literal["positive", "all", "self"]


@dataclass(frozen=True)
class StylePool:
    codes: np.ndarray  # (N, C, D) float32
    present: np.ndarray  # (N, C) bool
    has_infection: np.ndarray  # (N,) bool
    cases: tuple[str, ...] = field(default=())  # provenance: volume name per code
    indices: tuple[int, ...] = field(default=())  # provenance: slice index per code

    def __post_init__(self) -> None:
        n = len(self.codes)
        if self.codes.ndim != 3 or self.present.shape != self.codes.shape[:2] or self.has_infection.shape != (n,):
            raise ValueError(
                f"style pool: codes (N, C, D), present (N, C), has_infection (N,) expected, got "
                f"{self.codes.shape}, {self.present.shape}, {self.has_infection.shape}"
            )

    def __len__(self) -> int:
        return len(self.codes)

    @property
    def style_dim(self) -> int:
        return int(self.codes.shape[2])

    @property
    def n_positive(self) -> int:
        return int(self.has_infection.sum())

    def members(self, mode: PoolMode) -> np.ndarray:
        """Indices of the codes a mode draws from; raises when that subset is empty."""
        if mode == "self":
            raise ValueError("pool mode 'self' uses the request's own images and the encoder, not the pool")
        if mode not in ("positive", "all"):
            raise ValueError(f"unknown pool mode {mode!r}; use positive, all or self")
        chosen = np.flatnonzero(self.has_infection) if mode == "positive" else np.arange(len(self))
        if len(chosen) == 0:
            what = "labeled slices with infection (N+ = 0)" if mode == "positive" else "codes"
            raise ValueError(f"style pool has no {what}; cannot draw in mode {mode!r}")
        return chosen

    def draw(
        self, batch: int, k: int, generator: torch.Generator | None = None, mode: PoolMode = "positive"
    ) -> torch.Tensor:
        """One reference style (B, C, D) float32, repeated over the batch (see module docstring)."""
        if k < 1:
            raise ValueError(f"pool k must be >= 1, got {k}")
        chosen = self.members(mode)
        if len(chosen) > k:
            pick = torch.randperm(len(chosen), generator=generator)[:k].numpy()
            chosen = chosen[np.sort(pick)]
        codes = torch.from_numpy(self.codes[chosen])  # (K, C, D)
        weight = torch.from_numpy(self.present[chosen]).float()  # (K, C)
        reference = (codes * weight.unsqueeze(-1)).sum(0) / weight.sum(0).clamp(min=1.0).unsqueeze(-1)
        return reference.unsqueeze(0).expand(batch, -1, -1).contiguous()

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        with path.open("wb") as f:  # np.savez would append .npz to a name without it
            np.savez(
                f,
                codes=self.codes.astype(np.float32),
                present=self.present.astype(bool),
                has_infection=self.has_infection.astype(bool),
                cases=np.asarray(self.cases, dtype=str),
                indices=np.asarray(self.indices, dtype=np.int64),
            )
        return path

    @classmethod
    def load(cls, path: str | Path) -> StylePool:
        try:
            with np.load(Path(path), allow_pickle=False) as data:
                return cls(
                    codes=data["codes"].astype(np.float32),
                    present=data["present"].astype(bool),
                    has_infection=data["has_infection"].astype(bool),
                    cases=tuple(str(c) for c in data["cases"]),
                    indices=tuple(int(i) for i in data["indices"]),
                )
        except (OSError, KeyError, ValueError) as exc:
            raise ValueError(f"{path}: not a style pool file: {exc}") from exc


@torch.no_grad()
def build_style_pool(encoder: torch.nn.Module, batches: Iterable[dict], device: str | torch.device = "cpu") -> StylePool:
    """Encode every labeled slice once (eval mode, no augmentation) into a pool.

    ``batches`` yields dicts with "image" (B, 1, S, S) in [0, 1], "onehot" (B, C, S, S) and
    optionally "has_infection" (B,) (the ground truth at the data's own size, which a small
    lesion may not survive resizing; default: class 3 present in the map), "case" / "index".
    ``present`` is read at the encoder's feature resolution.
    """
    from plsynth.models.sean import region_average, resize_nearest

    was_training = encoder.training
    encoder.eval()
    codes, present, infected, cases, indices = [], [], [], [], []
    try:
        for batch in batches:
            onehot = batch["onehot"].to(device).float()
            image = batch["image"].to(device).float() * 2 - 1
            features = encoder.features(image)
            codes.append(region_average(features, onehot).cpu())
            present.append(resize_nearest(onehot, features.shape[-2:]).sum(dim=(2, 3)).cpu() > 0)
            if "has_infection" in batch:
                infected.append(torch.as_tensor(batch["has_infection"]).bool().cpu())
            else:
                infected.append(onehot[:, 3].sum(dim=(1, 2)).cpu() > 0)
            n = len(onehot)
            cases.extend(str(c) for c in batch.get("case", [""] * n))
            indices.extend(int(i) for i in batch.get("index", [-1] * n))
    finally:
        encoder.train(was_training)
    if not codes:
        raise ValueError("cannot build a style pool from no labeled slices")
    pool = StylePool(
        codes=torch.cat(codes).numpy().astype(np.float32),
        present=torch.cat(present).numpy(),
        has_infection=torch.cat(infected).numpy(),
        cases=tuple(cases),
        indices=tuple(indices),
    )
    log.info("style pool: %d codes, %d with infection (N+)", len(pool), pool.n_positive)
    return pool
