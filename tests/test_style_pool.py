"""Style code pool: N+ membership, per-class averaging over present codes, seeding, save/load."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from plsynth.models.sean import StyleEncoder
from plsynth.bundles.style_pool import StylePool, build_style_pool

torch.set_num_threads(1)


def make_pool(n_pos: int, n_neg: int, dim: int = 3) -> StylePool:
    """Positive codes hold 1 + i in every entry, negative ones -100: a draw shows where it came from."""
    n = n_pos + n_neg
    codes = np.zeros((n, 4, dim), np.float32)
    codes[:n_pos] = (1.0 + np.arange(n_pos, dtype=np.float32))[:, None, None]
    codes[n_pos:] = -100.0
    present = np.ones((n, 4), bool)
    has_infection = np.arange(n) < n_pos
    present[~has_infection, 3] = False
    codes[~has_infection, 3] = 0.0
    return StylePool(codes, present, has_infection)


def test_positive_mode_draws_only_codes_of_slices_with_infection():
    pool = make_pool(n_pos=6, n_neg=20)
    for seed in range(5):
        ref = pool.draw(2, k=3, generator=torch.Generator().manual_seed(seed), mode="positive")
        assert ref.shape == (2, 4, 3)
        assert torch.all(ref >= 1) and torch.all(ref <= 6)  # means of values 1..6 only
        assert torch.equal(ref[0], ref[1])  # one reference code per request batch (paper eq. 9)


def test_all_mode_can_draw_infection_free_codes():
    pool = make_pool(n_pos=2, n_neg=20)
    refs = [pool.draw(1, k=3, generator=torch.Generator().manual_seed(s), mode="all") for s in range(10)]
    assert any(float(r[0, 0, 0]) < 0 for r in refs)


def test_classes_absent_in_a_code_do_not_drag_the_mean_toward_zero():
    pool = make_pool(n_pos=1, n_neg=3)
    ref = pool.draw(1, k=10, mode="all")  # k > N: every code is used
    # infection row: only the positive code has it, so the mean is its value, not 1/4 of it
    assert torch.allclose(ref[0, 3], torch.ones(3))
    expected_lung = (1.0 + 3 * -100.0) / 4
    assert torch.allclose(ref[0, 1], torch.full((3,), expected_lung))


def test_class_present_in_no_drawn_code_stays_a_zero_row():
    pool = make_pool(n_pos=0, n_neg=5)
    ref = pool.draw(1, k=2, generator=torch.Generator().manual_seed(0), mode="all")
    assert torch.all(ref[0, 3] == 0)


def test_positive_mode_with_no_infected_slice_is_a_clear_error():
    pool = make_pool(n_pos=0, n_neg=5)
    with pytest.raises(ValueError, match="N\\+ = 0"):
        pool.draw(1, k=2, mode="positive")
    with pytest.raises(ValueError, match="self"):
        pool.draw(1, k=2, mode="self")


def test_draws_are_seeded():
    pool = make_pool(n_pos=30, n_neg=0)
    a = pool.draw(1, 5, torch.Generator().manual_seed(7))
    b = pool.draw(1, 5, torch.Generator().manual_seed(7))
    c = pool.draw(1, 5, torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_pool_round_trips_through_npz(tmp_path):
    pool = make_pool(3, 2)
    pool = StylePool(pool.codes, pool.present, pool.has_infection, cases=tuple("abcde"), indices=(1, 2, 3, 4, 5))
    loaded = StylePool.load(pool.save(tmp_path / "pool.npz"))
    np.testing.assert_array_equal(loaded.codes, pool.codes)
    np.testing.assert_array_equal(loaded.present, pool.present)
    np.testing.assert_array_equal(loaded.has_infection, pool.has_infection)
    assert loaded.cases == pool.cases and loaded.indices == pool.indices
    with pytest.raises(ValueError, match="not a style pool"):
        StylePool.load(tmp_path / "missing.npz")


def test_built_pool_marks_exactly_the_slices_with_infection_as_n_plus():
    size = 32
    semantic = torch.zeros(5, size, size, dtype=torch.long)
    semantic[:, 8:24, 4:14] = 2
    semantic[:, 8:24, 18:28] = 1
    with_infection = [0, 3]
    for i in with_infection:
        semantic[i, 12:16, 20:24] = 3
    onehot = F.one_hot(semantic, 4).permute(0, 3, 1, 2).float()
    images = torch.rand(5, 1, size, size)
    encoder = StyleEncoder(style_dim=6, width=4)
    batches = [
        {"image": images[:3], "onehot": onehot[:3], "case": ["v"] * 3, "index": [0, 1, 2]},
        {"image": images[3:], "onehot": onehot[3:], "case": ["w"] * 2, "index": [0, 1]},
    ]
    pool = build_style_pool(encoder, batches)
    assert len(pool) == 5 and pool.n_positive == 2
    assert list(np.flatnonzero(pool.has_infection)) == with_infection
    assert pool.present[:, 3].tolist() == [True, False, False, True, False]
    assert np.all(pool.codes[~pool.present] == 0)
    with torch.no_grad():
        expected = encoder(images * 2 - 1, onehot).numpy()
    np.testing.assert_allclose(pool.codes, expected, atol=1e-6)
    assert pool.cases == ("v", "v", "v", "w", "w")
    drawn = pool.draw(1, k=10, mode="positive")
    np.testing.assert_allclose(drawn[0].numpy(), expected[with_infection].mean(0), atol=1e-6)
