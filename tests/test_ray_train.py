"""The TorchTrainer wrapper on a real local Ray cluster, running the real loop (`loop.train`):
DDP across two workers, checkpoints reported through Ray Train, and a worker that dies mid-run
restarted by Ray Train (``ray.max_failures``) and resuming from its checkpoint, not from step 0.

Baseline on the phantom-smoke preset, so it takes well under a minute of training on 2 CPUs;
test_data_parallel.py compares 1- and 2-worker runs of CPS, test_ray_jobs.py the entry points.
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
from plsynth.training.loop import build_networks  # noqa: E402
from plsynth.training.ray_train import train_on_ray  # noqa: E402
from plsynth.training.schedule import BatchPlan, total_iterations  # noqa: E402

pytestmark = pytest.mark.ray
REPO = Path(__file__).resolve().parents[1]


def _cfg():
    cfg = load_config(REPO / "configs" / "phantom-smoke.yaml",
                      ["train.method=baseline", "train.threads=1", "train.epochs=2", "train.device=cpu"])
    return cfg.replace(ray=dataclasses.replace(cfg.ray, num_workers=2, cpus_per_worker=0.5, max_failures=2))


@pytest.fixture(scope="module")
def ddp_run_with_one_crash(ray_local, tmp_path_factory):
    """Two workers; rank 0 exits hard right after its first checkpointed report (end of epoch 1)."""
    out = tmp_path_factory.mktemp("ray-train")
    cfg = _cfg()
    data = build_splits(cfg, out)  # in the driver, as the entry points do: workers only read the cache
    plan = BatchPlan(len(data.labeled), len(data.unlabeled), cfg.train.batch_labeled, cfg.train.batch_unlabeled,
                     cfg.train.seed)
    result = train_on_ray(cfg, out, fail_after_reports=1, fail_marker=str(out / "crashed"))
    return out, result, cfg, plan


def test_the_real_loop_trained_every_step_and_left_a_bundle(ddp_run_with_one_crash):
    out, result, cfg, plan = ddp_run_with_one_crash
    total = total_iterations(cfg.train.epochs, plan.iters_per_epoch, cfg.train.max_iters)
    last = load_checkpoint(out / "last.pt")
    assert last["step"] == total and result.metrics["step"] == total
    initial = build_networks(cfg)["model"].state_dict()  # the seeded initialisation loop.train starts from
    moved = max(float((last["networks"]["model"][k] - v).abs().max()) for k, v in initial.items()
                if v.is_floating_point())
    assert moved > 1e-3
    assert (out / "bundle" / "meta.json").is_file()  # written by rank 0 through bundles.segmenter


def test_a_crashed_worker_group_resumes_from_its_checkpoint_not_from_step_0(ddp_run_with_one_crash):
    out, result, cfg, plan = ddp_run_with_one_crash
    assert (out / "crashed").exists()  # the fault really happened
    attempts = [json.loads(line) for line in (out / "ray_attempts.jsonl").read_text().splitlines()]
    rank0 = [a for a in attempts if a["rank"] == 0]
    assert [a["resume_step"] for a in rank0] == [0, plan.iters_per_epoch]
    assert len({a["pid"] for a in rank0}) == 2  # a new process after the crash
    # only the restarted attempt finished; both of its ranks started at the checkpoint's step
    work = [json.loads(line) for line in (out / "ray_work.jsonl").read_text().splitlines()]
    assert sorted((w["rank"], w["start_step"]) for w in work) == [(0, plan.iters_per_epoch), (1, plan.iters_per_epoch)]
    # checkpoints went through Ray Train to the storage path, the last one at the final step
    assert result.checkpoint is not None and Path(result.checkpoint.path).is_relative_to(out / "ray")

