"""A killed run resumed from its last checkpoint reproduces the losses of an uninterrupted run."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from _training_data import FakeSynthesizer, tiny_splits
from plsynth.config import Config, DataConfig, OptimConfig, TrainConfig, UNetConfig
from plsynth.training.loop import TrainHooks, train

torch.set_num_threads(1)
TESTS = Path(__file__).resolve().parent


def _cfg(method: str, **train) -> Config:
    base = dict(method=method, epochs=3, batch_labeled=3, batch_unlabeled=4, rotate_degrees=12.0, flip=True,
                checkpoint_every=2)
    base.update(train)
    return Config(data=DataConfig(image_size=32), model=UNetConfig(width=4, depth=2), optim=OptimConfig(lr=0.05),
                  train=TrainConfig(**base))


def _losses(out: Path) -> list[tuple[str, str, str]]:
    with open(out / "log.csv", newline="") as handle:
        return [(r["step"], r["lr"], r["loss"]) for r in csv.DictReader(handle)]


class Crash(RuntimeError):
    pass


class CrashAt(TrainHooks):
    def __init__(self, step: int) -> None:
        super().__init__("cpu")
        self.step = step

    def after_step(self, step, terms):
        if step == self.step:
            raise Crash(f"killed after step {step}")


def test_sa_cps_resumed_after_a_crash_reproduces_the_uninterrupted_losses(tmp_path):
    cfg = _cfg("sa-cps")
    data = tiny_splits(5, 10)  # 3 iterations per epoch, 9 in all
    whole = train(cfg, tmp_path / "whole", data=data, synth=FakeSynthesizer(), write_bundle=False)
    expected = _losses(tmp_path / "whole")
    assert len(expected) == 9

    out = tmp_path / "killed"
    with pytest.raises(Crash):  # dies mid-epoch 2, after step 6; last.pt holds step 6 (checkpoint_every 2)
        train(cfg, out, CrashAt(6), data=data, synth=FakeSynthesizer(), write_bundle=False)
    assert len(_losses(out)) == 7
    resumed = train(cfg, out, data=data, synth=FakeSynthesizer(), write_bundle=False)
    assert _losses(out) == expected  # steps 6..8 rerun bit for bit, rows of the dead run replaced
    assert resumed.best == whole.best
    val_steps = [r.split(",")[0] for r in (out / "val.csv").read_text().splitlines()[1:]]
    assert val_steps == ["3", "6", "9"]


def test_resume_refuses_a_run_folder_started_with_another_config(tmp_path):
    data = tiny_splits(4, 4)
    train(_cfg("baseline", epochs=1), tmp_path, data=data, write_bundle=False)
    with pytest.raises(ValueError, match="optim.lr"):
        changed = _cfg("baseline", epochs=1)
        changed = changed.replace(optim=OptimConfig(lr=0.5))
        train(changed, tmp_path, data=data, write_bundle=False)


@pytest.mark.slow
def test_baseline_killed_by_sigkill_resumes_to_the_same_losses(tmp_path):
    script = textwrap.dedent(
        f"""
        import os, signal, sys
        sys.path.insert(0, {str(TESTS)!r})
        import torch
        torch.set_num_threads(1)
        from pathlib import Path
        from _training_data import tiny_splits
        from test_resume import _cfg
        from plsynth.training.loop import TrainHooks, train

        class Kill(TrainHooks):
            def after_step(self, step, terms):
                if step == int(sys.argv[2]):
                    os.kill(os.getpid(), signal.SIGKILL)

        train(_cfg("baseline", val_every_iters=10**6), Path(sys.argv[1]), Kill(), data=tiny_splits(5, 10),
              write_bundle=False)
        """
    )
    # keep the caller's PYTHONPATH: the subprocess must import the plsynth under test
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(TESTS), os.environ.get("PYTHONPATH")) if p)}
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    subprocess.run([sys.executable, "-c", script, str(whole), "-1"], check=True, env=env, timeout=300)
    proc = subprocess.run([sys.executable, "-c", script, str(killed), "4"], env=env, timeout=300)
    assert proc.returncode == -signal.SIGKILL
    subprocess.run([sys.executable, "-c", script, str(killed), "-1"], check=True, env=env, timeout=300)
    assert _losses(killed) == _losses(whole)
