"""Learning-rate schedule and data order, as pure functions of (seed, step).

The paper decays the learning rate polynomially (power 0.9); the official code steps it per
iteration, which we do too. Data order is a pure function of the run's seed and the epoch
(unlabeled slices) or of the running sample count (labeled slices, which cycle), so a run
killed at step t and resumed there draws exactly the batches an uninterrupted run would.

An epoch is one pass over the unlabeled slices, for every method (the baseline too, which then
sees the same number of labeled batches as the semi-supervised methods: the same budget).
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

import numpy as np


@enum.unique
class Stream(enum.IntEnum):
    """The random streams of a run, one per use, each drawn by `step_seed` (seed, index, stream).

    The values are part of every run's numbers (changing one changes its losses): keep them.
    Every data-parallel worker draws the same AUGMENT transforms for the whole global batch and
    takes its rows, so no stream depends on the worker's rank.
    """

    AUGMENT = 0  # index: step; flips and angles of the step's global batch
    SYNTHESIS = 1  # index: step; the synthesizer's pool draw and noise (sa-cps)
    NETWORK_INIT = 3  # index: network number; initial weights (CPS: two different initialisations)
    OFFLINE_SYNTHESIS = 5  # index: offline batch; the synthesizer's draw for the st / sa-st offline set


@enum.unique
class Order(enum.IntEnum):
    """The streams of `permutation` (data order), apart from `Stream`: another seed sequence."""

    LABELED = 1
    UNLABELED = 2


def poly_lr(step: int, total: int, base: float, power: float = 0.9) -> float:
    """``base * (1 - step / total) ** power``; 0 at and after ``total`` (paper IV-A.4)."""
    if total <= 0:
        raise ValueError(f"poly_lr: total must be > 0, got {total}")
    return base * max(0.0, 1.0 - step / total) ** power


def iterations_per_epoch(n_unlabeled: int, batch_unlabeled: int, n_labeled: int = 0, batch_labeled: int = 1) -> int:
    """``ceil(n_unlabeled / batch_unlabeled)``; without unlabeled slices one pass over the labeled ones."""
    if n_unlabeled > 0:
        return math.ceil(n_unlabeled / batch_unlabeled)
    if n_labeled > 0:
        return math.ceil(n_labeled / batch_labeled)
    raise ValueError("no training slices: both the labeled and the unlabeled set are empty")


def permutation(n: int, seed: int, stream: Order, epoch: int) -> np.ndarray:
    """A permutation of range(n) that depends only on (seed, stream, epoch)."""
    return np.random.default_rng([seed, int(stream), epoch]).permutation(n)


@dataclass(frozen=True)
class BatchPlan:
    """Which slices go into the batch of each step.

    Unlabeled: epoch ``e = step // iters_per_epoch`` shuffles all unlabeled slices with
    ``permutation(n, seed, U, e)`` and takes consecutive chunks (the last one may be short).
    Labeled: an endless stream of reshuffled passes; step t takes stream positions
    ``[t * batch_labeled, (t + 1) * batch_labeled)``, so the labeled set cycles independently of
    the unlabeled epoch, as the official code's ``cycle(labeled_loader)`` does.
    """

    n_labeled: int
    n_unlabeled: int
    batch_labeled: int
    batch_unlabeled: int
    seed: int

    @property
    def iters_per_epoch(self) -> int:
        return iterations_per_epoch(self.n_unlabeled, self.batch_unlabeled, self.n_labeled, self.batch_labeled)

    @property
    def smallest_unlabeled_batch(self) -> int:
        """Slices in the smallest unlabeled batch (the last of an epoch may be short)."""
        return min(self.batch_unlabeled, self.n_unlabeled - (self.iters_per_epoch - 1) * self.batch_unlabeled)

    def epoch_of(self, step: int) -> int:
        return step // self.iters_per_epoch

    def labeled(self, step: int) -> np.ndarray:
        if self.n_labeled == 0:
            return np.zeros(0, dtype=np.int64)
        positions = np.arange(step * self.batch_labeled, (step + 1) * self.batch_labeled)
        passes, offsets = np.divmod(positions, self.n_labeled)
        cache: dict[int, np.ndarray] = {}
        out = np.empty(len(positions), dtype=np.int64)
        for i, (p, o) in enumerate(zip(passes.tolist(), offsets.tolist())):
            if p not in cache:
                cache[p] = permutation(self.n_labeled, self.seed, Order.LABELED, p)
            out[i] = cache[p][o]
        return out

    def unlabeled(self, step: int) -> np.ndarray:
        if self.n_unlabeled == 0:
            return np.zeros(0, dtype=np.int64)
        epoch, within = divmod(step, self.iters_per_epoch)
        order = permutation(self.n_unlabeled, self.seed, Order.UNLABELED, epoch)
        return order[within * self.batch_unlabeled : (within + 1) * self.batch_unlabeled].astype(np.int64)


def total_iterations(epochs: int, iters_per_epoch: int, max_iters: int = 0) -> int:
    """The run's length: ``epochs * iters_per_epoch``, capped by ``max_iters`` when > 0."""
    total = epochs * iters_per_epoch
    return min(total, max_iters) if max_iters > 0 else total


def validates_after(done: int, total: int, iters_per_epoch: int, every: int) -> bool:
    """Whether the run validates after ``done`` iterations: every ``every`` iterations (0: at the
    end of every epoch) and always after the last one, so every run ends with its final score."""
    if done == total:
        return True
    return done % (every or iters_per_epoch) == 0


def step_seed(seed: int, index: int, stream: Stream) -> int:
    """A 63-bit seed for one use (``stream``) at one ``index`` (a step, a network, an offline batch)."""
    return int(np.random.default_rng([seed, 7919, int(stream), index]).integers(0, 2**63 - 1))
