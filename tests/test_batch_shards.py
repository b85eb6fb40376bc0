"""The data-parallel split of a global batch (`BatchMaker` with rank / world_size), without Ray.

The shards of N workers, concatenated in rank order, are exactly the single-process batch
(same slices, same flips and angles), for labeled and unlabeled slices, odd batches included;
a batch smaller than N is refused with the fix named.
"""

from __future__ import annotations

import pytest
import torch

from _training_data import tiny_splits
from plsynth.config import Config, ConfigError, DataConfig, TrainConfig, UNetConfig
from plsynth.training.loop import BatchMaker
from plsynth.training.schedule import BatchPlan


def _maker(data, rank: int, world: int, batch_unlabeled: int = 5) -> BatchMaker:
    cfg = Config(data=DataConfig(image_size=32), model=UNetConfig(width=4, depth=2),
                 train=TrainConfig(method="cps", batch_labeled=4, batch_unlabeled=batch_unlabeled, rotate_degrees=15.0))
    plan = BatchPlan(len(data.labeled), len(data.unlabeled), 4, batch_unlabeled, 0)
    return BatchMaker(cfg, data.labeled, data.unlabeled, plan, "cpu", rank=rank, world_size=world)


@pytest.mark.parametrize("world", [2, 3])
def test_the_shards_of_n_workers_make_up_the_single_process_batch(world):
    data = tiny_splits(n_labeled=6, n_unlabeled=15)
    single = _maker(data, 0, 1)
    shards = [_maker(data, r, world) for r in range(world)]
    for step in range(4):  # batches of 5 unlabeled slices: odd, shared 3+2 or 2+2+1
        whole = single(step)
        parts = [m(step) for m in shards]
        for key, value in whole.items():
            torch.testing.assert_close(torch.cat([p[key] for p in parts]), value, rtol=0, atol=0, msg=key)
        assert [p["u_image"].shape[0] for p in parts] == [len(c) for c in torch.arange(5).tensor_split(world)]
    assert sum(m.seen["labeled"] for m in shards) == single.seen["labeled"] == 16
    assert sum(m.seen["unlabeled"] for m in shards) == single.seen["unlabeled"] == 20


def test_a_batch_smaller_than_the_number_of_workers_is_refused():
    data = tiny_splits(n_labeled=6, n_unlabeled=11)  # the last unlabeled batch of an epoch holds 1 slice
    with pytest.raises(ConfigError, match="ray.num_workers"):  # a config error: exit 2
        _maker(data, 0, 2)
