"""Data-parallel training on a real local Ray cluster: the real loop (CPS on phantoms) with 1 and
2 Ray Train workers.

2 workers each process half of every global batch (counted in ``ray_work.jsonl``), and their
parameters after the run's k steps equal those of the 1-worker run within float tolerance
(the loss is that of the global batch, DDP averages the gradients); a 2-worker run killed after
its first checkpoint resumes with 1 worker and ends where the uninterrupted run ends.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")
torch = pytest.importorskip("torch")
pytest.importorskip("ray.train.torch")

from plsynth.config import load_config  # noqa: E402
from plsynth.data.datasets import build_splits  # noqa: E402
from plsynth.training.checkpoint import load_checkpoint  # noqa: E402
from plsynth.training.ray_train import train_on_ray  # noqa: E402
from plsynth.training.schedule import BatchPlan  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[1]


def _cfg(workers: int, max_failures: int = 0):
    cfg = load_config(REPO / "configs" / "phantom-smoke.yaml",
                      ["train.method=cps", "train.threads=1", "train.epochs=2", "train.device=cpu"])
    return cfg.replace(ray=dataclasses.replace(cfg.ray, num_workers=workers, cpus_per_worker=0.5,
                                               max_failures=max_failures))


def _run(out: Path, workers: int, **kwargs):
    cfg = _cfg(workers, **{k: kwargs.pop(k) for k in ("max_failures",) if k in kwargs})
    build_splits(cfg, out)  # in the driver, as the entry points do: workers only read the cache
    return train_on_ray(cfg, out, name=f"dp-{workers}-{out.name}", **kwargs)


def _params(path: Path) -> dict[str, torch.Tensor]:
    state = load_checkpoint(path)
    return {f"{net}.{k}": v for net, weights in state["networks"].items() for k, v in weights.items()
            if v.is_floating_point()}


def _work(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "ray_work.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(ray_local, tmp_path_factory):
    one, two = tmp_path_factory.mktemp("dp1"), tmp_path_factory.mktemp("dp2")
    _run(one, 1)
    _run(two, 2)
    return one, two


def test_two_workers_each_process_half_of_every_global_batch(runs):
    one, two = runs
    cfg = _cfg(1)
    single = _work(one)
    assert [w["rank"] for w in single] == [0]
    total = single[0]["samples"]
    steps = single[0]["steps"]
    assert total["labeled"] == steps * cfg.train.batch_labeled
    assert total["unlabeled"] > 0
    shares = sorted(_work(two), key=lambda w: w["rank"])
    assert [w["rank"] for w in shares] == [0, 1] and all(w["world_size"] == 2 for w in shares)
    # The global batches the single-process run drew: every labeled one full, the unlabeled ones
    # of each epoch full except the last (the smoke preset has 23 unlabeled slices: 4+4+4+4+4+3).
    data = build_splits(cfg, one)
    plan = BatchPlan(len(data.labeled), len(data.unlabeled), cfg.train.batch_labeled, cfg.train.batch_unlabeled,
                     cfg.train.seed)
    sizes = {"labeled": [len(plan.labeled(s)) for s in range(steps)],
             "unlabeled": [len(plan.unlabeled(s)) for s in range(steps)]}
    assert sum(sizes["unlabeled"]) == total["unlabeled"] and 1 in {n % 2 for n in sizes["unlabeled"]}
    for kind, batch in sizes.items():
        assert shares[0]["samples"][kind] + shares[1]["samples"][kind] == total[kind]
        # half of each global batch; an odd one gives rank 0 the extra slice
        assert shares[0]["samples"][kind] == sum((n + 1) // 2 for n in batch)
        assert shares[1]["samples"][kind] == sum(n // 2 for n in batch)


def test_two_worker_parameters_equal_one_worker_parameters(runs):
    one, two = runs
    a, b = _params(one / "last.pt"), _params(two / "last.pt")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5, msg=key)
    assert load_checkpoint(one / "last.pt")["step"] == load_checkpoint(two / "last.pt")["step"]


def test_a_two_worker_run_resumes_with_one_worker(runs, tmp_path):
    one, _ = runs
    out = tmp_path / "resumed"
    out.mkdir()
    with pytest.raises(RuntimeError):  # rank 0 dies after its first checkpoint (end of epoch 1), no restarts
        _run(out, 2, fail_after_reports=1, fail_marker=str(out / "crashed"))
    assert (out / "crashed").exists()
    half = load_checkpoint(out / "last.pt")["step"]
    assert 0 < half < load_checkpoint(one / "last.pt")["step"]
    _run(out, 1)
    attempts = [json.loads(line) for line in (out / "ray_attempts.jsonl").read_text().splitlines()]
    assert sorted(a["world_size"] for a in attempts) == [1, 2, 2]  # two workers started, then one
    work = _work(out)  # only the finished attempt reports its work
    assert [(w["world_size"], w["start_step"]) for w in work] == [(1, half)]
    assert work[0]["samples"]["labeled"] == (work[0]["steps"] - half) * _cfg(1).train.batch_labeled
    a, c = _params(one / "last.pt"), _params(out / "last.pt")
    for key in a:
        torch.testing.assert_close(c[key], a[key], rtol=1e-4, atol=1e-5, msg=key)


def test_the_synthesizer_trains_as_a_one_worker_ray_train_run(ray_local, tmp_path):
    import os

    from plsynth.training.ray_entry import ensure_synth_bundle

    cfg = load_config(REPO / "configs" / "phantom-smoke.yaml", ["synth.epochs=1", "train.threads=1"])
    done = ensure_synth_bundle(cfg, tmp_path)
    assert Path(done.synth.bundle) == (tmp_path / "synth" / "bundle").resolve()
    assert (Path(done.synth.bundle) / "meta.json").is_file()
    attempts = [json.loads(line) for line in (tmp_path / "synth" / "ray_attempts.jsonl").read_text().splitlines()]
    assert [(a["rank"], a["world_size"]) for a in attempts] == [(0, 1)] and attempts[0]["pid"] != os.getpid()
