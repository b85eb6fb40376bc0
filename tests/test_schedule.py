"""Poly learning rate and data order as pure functions of (seed, step)."""

from __future__ import annotations

import numpy as np
import pytest

from plsynth.training.schedule import BatchPlan, iterations_per_epoch, poly_lr, total_iterations, validates_after


def test_poly_lr_starts_at_base_ends_at_zero_and_follows_power():
    assert poly_lr(0, 100, 0.01) == pytest.approx(0.01)
    assert poly_lr(50, 100, 0.01, 0.9) == pytest.approx(0.01 * 0.5**0.9)
    assert poly_lr(100, 100, 0.01) == 0.0
    assert poly_lr(150, 100, 0.01) == 0.0
    lrs = [poly_lr(s, 10, 1.0) for s in range(11)]
    assert all(a > b for a, b in zip(lrs, lrs[1:]))


def test_iterations_per_epoch_is_a_pass_over_the_unlabeled_slices():
    assert iterations_per_epoch(1600, 8) == 200
    assert iterations_per_epoch(17, 4) == 5  # last batch short
    assert iterations_per_epoch(0, 8, n_labeled=10, batch_labeled=4) == 3
    assert total_iterations(20, 200) == 4000
    assert total_iterations(20, 200, max_iters=150) == 150


def test_each_unlabeled_epoch_is_a_permutation_that_depends_on_seed_and_epoch_only():
    plan = BatchPlan(n_labeled=5, n_unlabeled=11, batch_labeled=2, batch_unlabeled=4, seed=3)
    ipe = plan.iters_per_epoch
    epoch0 = np.concatenate([plan.unlabeled(s) for s in range(ipe)])
    epoch1 = np.concatenate([plan.unlabeled(s) for s in range(ipe, 2 * ipe)])
    assert sorted(epoch0.tolist()) == list(range(11)) == sorted(epoch1.tolist())
    assert not np.array_equal(epoch0, epoch1)
    again = BatchPlan(5, 11, 2, 4, seed=3)
    assert np.array_equal(again.unlabeled(ipe + 1), plan.unlabeled(ipe + 1))
    other = BatchPlan(5, 11, 2, 4, seed=4)
    assert not np.array_equal(np.concatenate([other.unlabeled(s) for s in range(ipe)]), epoch0)


def test_labeled_slices_cycle_through_full_passes_independent_of_the_unlabeled_epoch():
    plan = BatchPlan(n_labeled=5, n_unlabeled=100, batch_labeled=2, batch_unlabeled=8, seed=0)
    stream = np.concatenate([plan.labeled(s) for s in range(10)])  # 20 draws = 4 passes over 5 slices
    for p in range(4):
        assert sorted(stream[5 * p : 5 * p + 5].tolist()) == list(range(5))
    assert np.array_equal(plan.labeled(7), BatchPlan(5, 100, 2, 8, 0).labeled(7))


def test_validation_every_n_iterations_ends_with_the_final_one():
    # 10 iterations per epoch, 25 in all: every 4 -> 4, 8, ..., 24 and the last (25)
    assert [d for d in range(1, 26) if validates_after(d, 25, 10, 4)] == [4, 8, 12, 16, 20, 24, 25]
    # 0: at the end of every epoch, and the last (short) epoch's end
    assert [d for d in range(1, 26) if validates_after(d, 25, 10, 0)] == [10, 20, 25]


def test_seed_streams_are_named_distinct_and_keep_their_values():
    from plsynth.training.schedule import Order, Stream, step_seed

    # the values are part of every run's numbers: changing one changes the losses of every run
    assert {s.name: int(s) for s in Stream} == {"AUGMENT": 0, "SYNTHESIS": 1, "NETWORK_INIT": 3,
                                                "OFFLINE_SYNTHESIS": 5}
    assert {s.name: int(s) for s in Order} == {"LABELED": 1, "UNLABELED": 2}
    seeds = {step_seed(7, 4, s) for s in Stream}
    assert len(seeds) == len(Stream)  # one step, four different draws
