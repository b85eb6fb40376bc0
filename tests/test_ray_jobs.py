"""`ray job submit` of both entry points against a real `ray start --head` cluster, end to end on
phantoms, plus the exit codes of the console scripts.

No ray.init() in this module: the cluster is a separate `ray start` (its own ports and temp
folder, so it cannot collide with an embedded Ray), stopped at the end. The jobs run the
console scripts exactly as a user would; the cluster finds them because `ray start` runs
with the venv's bin first on PATH (Ray runs entry points with that PATH's python). RAY_AUTH_MODE=disabled
for `ray start`, `ray job submit` and the jobs (token auth otherwise depends on whether ~/.ray/auth_token exists).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("ray.train.torch")

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

pytestmark = pytest.mark.ray


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}")
    env.pop("RAY_ADDRESS", None)
    return env


def test_console_script_exits_2_on_a_config_error_without_starting_ray(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  epochz: 3\n")
    proc = subprocess.run([str(BIN / "train_sa_cps"), "--config", str(bad), "--out", str(tmp_path / "o")],
                          env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "train.epochz" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "plsynth.training.ray_entry", "sa-st", "--config", str(bad)],
                          env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "train.epochz" in proc.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """`ray start --head --num-cpus 2 --block` on free ports; yields the dashboard (job API) URL.

    `--block` keeps the head in the foreground of its own process group, so the end of the
    test stops exactly this cluster (SIGTERM to that group) -- never `ray stop`, which would
    stop every Ray on the machine, other people's included.
    """
    import shutil
    import signal
    import time
    import urllib.request

    temp = Path("/tmp") / f"rayh7-{os.getpid()}"  # short: Ray's socket paths must stay < 108 chars
    gcs, dash, client = _free_port(), _free_port(), _free_port()
    cmd = [str(BIN / "ray"), "start", "--head", "--block", "--num-cpus", "2", "--disable-usage-stats",
           "--port", str(gcs), "--dashboard-port", str(dash), "--ray-client-server-port", str(client),
           "--temp-dir", str(temp), "--include-dashboard", "true"]
    log = open(tmp_path_factory.mktemp("ray-head") / "ray-start.log", "w")
    head = subprocess.Popen(cmd, env=_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.time() + 180
        while True:
            try:
                with urllib.request.urlopen(f"{url}/api/version", timeout=2) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                pass
            if head.poll() is not None or time.time() > deadline:
                pytest.fail(f"ray start --head did not come up (exit {head.poll()}); see {log.name}")
            time.sleep(0.5)
        yield url
    finally:
        # A graceful `ray start --block` shutdown took 33 s of the test run; the cluster's files are removed
        # below anyway, so it gets 5 s and then the whole group is killed.
        try:
            os.killpg(head.pid, signal.SIGTERM)
            head.wait(timeout=5)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(head.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        log.close()
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="module")
def synth_bundle(tmp_path_factory):
    from _fixtures import write_synth_bundle
    from plsynth.config import load_config

    cfg = load_config(REPO / "configs" / "phantom-smoke.yaml")
    return write_synth_bundle(tmp_path_factory.mktemp("synth") / "bundle", cfg)[0]


def _submit(address: str, *entrypoint: str) -> subprocess.CompletedProcess:
    cmd = [str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", str(REPO), "--", *entrypoint]
    return subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=900, cwd=REPO)


SMALL = ["--set", "train.epochs=1", "--set", "train.max_iters=2", "--set", "train.threads=1",
         "--set", "ray.synth_actor_cpus=0.25", "--set", "ray.cpus_per_worker=0.5"]


@pytest.mark.slow
def test_ray_job_submit_runs_train_sa_cps_then_train_sa_st_on_the_cluster(ray_head, synth_bundle, tmp_path):
    cps_out = tmp_path / "sa-cps"
    # Two data-parallel workers: each sends its half of the batch, the actor decodes both in one call.
    # The gather window is wide (2 s) because with 200 ms the two workers' requests once arrived
    # further apart than that in both iterations (ci-local on 2 cores, 2026-12-03); the window
    # costs at most 2 s per step here.
    proc = _submit(ray_head, "train_sa_cps", "--config", "configs/phantom-smoke.yaml", "--out", str(cps_out),
                   "--set", f"synth.bundle={synth_bundle}", *SMALL, "--set", "ray.num_workers=2",
                   "--set", "ray.synth_gather_ms=2000")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "succeeded" in (proc.stdout + proc.stderr).lower()
    summary = json.loads((cps_out / "ray_summary.json").read_text())
    assert summary["ray_mode"] == "cluster"  # joined `ray start`, did not start its own Ray
    assert Path(summary["code"]) == REPO / "src" / "plsynth" or "PYTHONPATH" not in os.environ  # this checkout ran
    stats = summary["synth"]["stats"]
    assert stats["requests"] == 2 * 2  # 2 iterations x 2 workers
    # each request: 2 of the 4 unlabeled slices, twice (one synthetic image per network)
    assert stats["decode_calls"] < stats["requests"] and max(stats["batch_sizes"]) == 2 * 4
    work = [json.loads(line) for line in (cps_out / "ray_work.jsonl").read_text().splitlines()]
    assert sorted(w["rank"] for w in work) == [0, 1] and all(w["samples"]["labeled"] == 2 * 2 for w in work)
    meta = json.loads((cps_out / "bundle" / "meta.json").read_text())
    assert meta  # a real segmenter bundle

    st_out = tmp_path / "sa-st"
    proc = _submit(ray_head, "train_sa_st", "--config", "configs/phantom-smoke.yaml", "--out", str(st_out),
                   "--set", f"synth.bundle={synth_bundle}", "--set", f"train.teacher={cps_out / 'bundle'}",
                   "--set", "ray.synth_actors=2", *SMALL, "--set", "ray.num_workers=2")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    summary = json.loads((st_out / "ray_summary.json").read_text())
    assert summary["synth"]["actors"] == 2 and summary["offline"]["shards"] >= 1
    manifest = json.loads((st_out / "offline" / "manifest.json").read_text())
    synthetic = np.load(st_out / "offline" / manifest["shards"][0]["synthetic"])
    assert synthetic.shape[0] == manifest["shards"][0]["stop"] and 0 <= synthetic.min() and synthetic.max() <= 1
    assert not list((st_out / "offline").glob(".tmp-*"))  # no half-written shard left behind
    assert (st_out / "bundle" / "meta.json").is_file()
    # the training loop reused the actors' shards instead of labeling again
    assert summary["metrics"]["step"] == 2
    # two student workers, each on half of every batch of the offline set (real, pseudo, synthetic)
    work = [json.loads(line) for line in (st_out / "ray_work.jsonl").read_text().splitlines()]
    assert sorted(w["rank"] for w in work) == [0, 1]
    assert all(w["samples"] == {"labeled": 2 * 2, "unlabeled": 2 * 2} for w in work)


@pytest.mark.slow
def test_a_failing_job_is_reported_failed_by_ray_job_submit(ray_head, tmp_path):
    proc = _submit(ray_head, "train_sa_cps", "--config", "configs/phantom-smoke.yaml", "--out", str(tmp_path),
                   "--set", "ray.num_workers=-1")
    assert proc.returncode != 0
    assert "failed" in (proc.stdout + proc.stderr).lower()
