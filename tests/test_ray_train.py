"""The TorchTrainer wrapper on a real local Ray cluster: DDP across two workers, checkpoints
reported through Ray Train, and a worker that dies mid-run resuming from its checkpoint.

The training function here is a tiny loop with the same contract as
`plsynth.training.loop.train` (cfg, out, hooks) -- real DDP, real SGD on a real
linear network -- so that the test takes seconds on 2 CPUs; the real loop runs end to end
through the entry points in test_ray_jobs.py.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")
torch = pytest.importorskip("torch")
pytest.importorskip("ray.train.torch")

from plsynth.config import Config, RayConfig  # noqa: E402
from plsynth.training.ray_train import train_on_ray  # noqa: E402

pytestmark = pytest.mark.ray
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

TOTAL_STEPS = 6
REPORT_EVERY = 2


def tiny_loop(cfg, out, hooks):
    """Same shape as train: resume from out/last.pt, checkpoint + report every REPORT_EVERY steps."""
    torch.set_num_threads(1)
    torch.manual_seed(0)  # same initial weights on every rank (DDP also broadcasts rank 0's)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    last = Path(out) / "last.pt"
    start = 0
    if last.is_file():
        state = torch.load(last, weights_only=False)
        net.load_state_dict(state["networks"]["model"])
        opt.load_state_dict(state["optimizers"]["model"])
        start = state["step"]
    elif hooks.is_main:
        torch.save(torch.nn.utils.parameters_to_vector(net.parameters()).detach(), Path(out) / "params_step0.pt")
    model = hooks.prepare_model(net)
    steps = []
    for step in range(start, TOTAL_STEPS):
        g = torch.Generator().manual_seed(1000 * hooks.rank + step)  # every rank sees different data
        x = torch.randn(16, 4, generator=g)
        y = x.sum(1, keepdim=True) * (1 + hooks.rank)
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        steps.append(step)
        done = step + 1
        if done % REPORT_EVERY == 0:
            if hooks.is_main:
                tmp = last.with_suffix(".tmp")
                torch.save({"step": done, "networks": {"model": net.state_dict()},
                            "optimizers": {"model": opt.state_dict()}}, tmp)
                os.replace(tmp, last)
            hooks.report({"step": done, "loss": float(loss)}, last)
    params = torch.nn.utils.parameters_to_vector(net.parameters()).detach()
    torch.save({"params": params, "steps": steps}, Path(out) / f"params_rank{hooks.rank}.pt")


@pytest.fixture(scope="module")
def ddp_run_with_one_crash(ray_local, tmp_path_factory):
    """Two workers (0.5 CPU each); rank 0 exits hard right after its first checkpointed report."""
    out = tmp_path_factory.mktemp("ray-train")
    cfg = Config(name="tiny", ray=RayConfig(num_workers=2, cpus_per_worker=0.5, max_failures=2))
    cfg = cfg.replace(train=dataclasses.replace(cfg.train, method="cps"))
    result = train_on_ray(cfg, out, loop_fn=tiny_loop, fail_after_reports=1, fail_marker=str(out / "crashed"))
    return out, result


def test_after_n_steps_every_worker_holds_the_same_parameters_and_they_moved(ddp_run_with_one_crash):
    out, _ = ddp_run_with_one_crash
    rank0 = torch.load(out / "params_rank0.pt")
    rank1 = torch.load(out / "params_rank1.pt")
    step0 = torch.load(out / "params_step0.pt")
    torch.testing.assert_close(rank0["params"], rank1["params"], rtol=0, atol=1e-6)
    assert (rank0["params"] - step0).abs().max() > 1e-3


def test_a_crashed_worker_group_resumes_from_its_checkpoint_not_from_step_0(ddp_run_with_one_crash):
    out, result = ddp_run_with_one_crash
    assert (out / "crashed").exists()  # the fault really happened
    attempts = [json.loads(line) for line in (out / "ray_attempts.jsonl").read_text().splitlines()]
    rank0 = [a for a in attempts if a["rank"] == 0]
    assert [a["resume_step"] for a in rank0] == [0, REPORT_EVERY]
    assert len({a["pid"] for a in rank0}) == 2  # a new process after the crash
    # the resumed attempt ran only the remaining steps
    assert torch.load(out / "params_rank0.pt")["steps"] == list(range(REPORT_EVERY, TOTAL_STEPS))
    # checkpoints went through Ray Train to the storage path, the last one at the final step
    assert result.checkpoint is not None and Path(result.checkpoint.path).is_relative_to(out / "ray")
    assert result.metrics["step"] == TOTAL_STEPS
