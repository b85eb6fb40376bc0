"""bench/accuracy.py: the plateau rule and the loss-term ends of its table, and the GPU preset's plan.

No GPU exists on this machine, so the GPU preset is checked by its dry run (the plan it would
run: config, device, AMP, sizes, rows); the training itself is the code every CPU test runs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

import machine  # noqa: E402
from accuracy import PLATEAU_TOLERANCE, final_terms, plateaued  # noqa: E402


def test_a_curve_plateaus_when_its_last_quarter_stays_within_the_tolerance_of_the_final_value():
    rising = [(100, 0.50), (200, 0.60), (300, 0.66), (400, 0.70)]  # last quarter: steps >= 300
    assert plateaued(rising) is False  # 0.66 is 0.04 below the final 0.70
    flat = [(100, 0.50), (200, 0.68), (300, 0.70 - PLATEAU_TOLERANCE / 2), (400, 0.70)]
    assert plateaued(flat) is True
    assert plateaued([(200, 0.6), (400, 0.7)]) is None  # one point in the last quarter: no verdict


def test_a_loss_term_ends_at_its_mean_over_the_last_steps_counting_a_resumed_step_once(tmp_path):
    """A killed run resumed from its step-2 checkpoint logs steps 2-3 twice; the later rows count."""
    from plsynth.training.run_log import RunLog

    def log(start: int, rows: list[tuple[int, float, float]], out=tmp_path) -> None:
        run_log = RunLog(out, start_step=start)
        for step, pseudo, synthetic in rows:
            row = {"step": step, "epoch": 0, "lr": 0.01, "loss": 9, "loss_s": 1, "seconds": 0.5}
            run_log.train(row | ({"loss_pseudo": pseudo, "loss_synthetic": synthetic} if pseudo is not None else {}))
        run_log.close()

    log(0, [(0, 9, 9), (1, 0.5, 0.1), (2, 9, 9), (3, 9, 9)])
    log(2, [(2, 0.3, 0.2), (3, 0.4, 0.6)])  # killed after step 3, resumed from the step-2 checkpoint
    ended = final_terms(tmp_path, window=3)
    assert ended["loss_pseudo"] == pytest.approx(0.4) and ended["loss_synthetic"] == pytest.approx(0.3)
    log(0, [(0, None, None), (1, None, None)], out=tmp_path / "baseline")
    assert set(final_terms(tmp_path / "baseline")) == {"loss_s"}  # a baseline logs no pseudo or synthetic term


def test_the_gpu_preset_is_one_flag_and_plans_cuda_amp_at_256_px(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "accuracy.py"), "--preset", "gpu", "--dry-run",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=120, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    plan = json.loads(proc.stdout)
    assert Path(plan["config"]).name == "semiseg-gpu.yaml"
    assert (plan["device"], plan["amp"], plan["image_size"], plan["batch"]) == ("cuda", "auto", 256, [8, 8])
    assert plan["bundle_from"] == "last" and plan["val_every_iters"] > 0  # final checkpoint, with a curve
    assert plan["train_synthesizer"] and plan["synthesizer"] == str(tmp_path / "synthesizer")
    assert [(r["method"], r["seed"]) for r in plan["rows"]] == [(m, s) for m in ("baseline", "cps", "sa-cps")
                                                               for s in (0, 1, 2)]
    assert Path(plan["results"]).name == "accuracy-gpu.md"
    assert not (tmp_path / "accuracy.json").exists() and not (tmp_path / "synthesizer").exists()  # nothing ran



def test_the_cpu_preset_plans_its_synthesizers_frozen_baseline_first(tmp_path):
    """semiseg-cpu trains its synthesizer against a frozen baseline (synth.lambda_seg): a fresh OUT plans
    the first seed's baseline as that segmenter, trained before the synthesizer."""
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "accuracy.py"), "--preset", "cpu", "--dry-run",
                           "--methods", "sa-cps", "--seeds", "1", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    plan = json.loads(proc.stdout)
    assert plan["train_synthesizer"] and plan["synth_segmenter"] == str(tmp_path / "baseline-s1" / "bundle")

def _bench(out: Path, record: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(REPO / "bench" / "accuracy.py"), "--config",
                           str(REPO / "configs" / "phantom-smoke.yaml"), "--seeds", "0", "--out", str(out),
                           "--record", str(record), "--results", str(out.parent / "table.md"),
                           "--set", "train.threads=1", "--set", "train.max_iters=2", *args],
                          env=env, capture_output=True, text=True, timeout=600, cwd=REPO)


def test_a_recorded_row_survives_its_run_folder_and_the_table_pairs_each_claim_by_seed(tmp_path):
    """A table built over sessions: the record keeps every finished row, a later call whose run folders
    are gone does not retrain a row recorded with the same config, and does retrain a changed one;
    rows from another machine are reused, and the table says which row ran where."""
    out, record = tmp_path / "runs", tmp_path / "kept" / "accuracy.json"
    first = _bench(out, record, "--methods", "baseline", "cps")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    results = json.loads(record.read_text())["results"]
    base, cps = results["baseline"][0], results["cps"][0]
    table = (tmp_path / "table.md").read_text()
    assert f"| cps > baseline | s0 {cps['dice'] - base['dice']:+.3f} |" in table
    assert base["machine"] == machine.describe() and f"Machine: {machine.describe()}." in table

    import shutil
    shutil.rmtree(out)  # the next session finds the run folder gone
    plan = json.loads(_bench(out, record, "--methods", "baseline", "cps", "st", "--dry-run").stdout)
    # st is new; its teacher is recorded but its bundle is gone, so the teacher is trained again
    assert plan["train"] == [str(out / "baseline-s0"), str(out / "st-s0")]
    changed = json.loads(_bench(out, record, "--methods", "baseline", "--dry-run", "--set", "optim.lr=0.02").stdout)
    assert changed["train"] == [str(out / "baseline-s0")]  # another experiment: not the recorded row

    kept = json.loads(record.read_text())
    kept["results"]["baseline"][0]["machine"] = "another CPU, 2 CPUs"  # the baseline row ran in another session
    record.write_text(json.dumps(kept))
    again = _bench(out, record, "--methods", "baseline", "cps")
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert not (out / "baseline-s0").exists() and not (out / "cps-s0").exists()  # nothing retrained
    assert "it ran on another CPU, 2 CPUs, not this machine" in again.stderr
    assert json.loads(record.read_text())["results"]["cps"][0]["dice"] == cps["dice"]
    table = (tmp_path / "table.md").read_text()
    assert f"| cps > baseline | s0 {cps['dice'] - base['dice']:+.3f} |" in table
    assert "- another CPU, 2 CPUs: baseline s0" in table and f"- {machine.describe()}: cps s0" in table


def test_a_synthesizer_with_a_consistency_term_gets_the_first_seeds_baseline_trained_first(tmp_path):
    """synth.lambda_seg needs a frozen segmenter; when the configured one does not exist the bench
    trains the first seed's baseline, then the synthesizer on it, then the SA-CPS row."""
    out, record = tmp_path / "runs", tmp_path / "accuracy.json"
    args = ("--methods", "sa-cps", "--set", "synth.lambda_seg=1.0", "--set", f"synth.segmenter={tmp_path / 'none'}",
            "--set", "synth.epochs=1")
    plan = json.loads(_bench(out, record, *args, "--dry-run").stdout)
    assert plan["train_synthesizer"] and plan["synth_segmenter"] == str(out / "baseline-s0" / "bundle")
    run = _bench(out, record, *args)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    meta = json.loads((out / "synthesizer" / "bundle" / "meta.json").read_text())
    used = json.dumps(meta)
    assert str(out / "baseline-s0" / "bundle") in used and "consistency_segmenter" in used
    results = json.loads(record.read_text())["results"]
    assert set(results) == {"baseline", "sa-cps"}
    ended = results["sa-cps"][0]["final_terms"]  # the table says where SA-CPS's two unlabeled terms end
    verdict = "yes" if ended["loss_synthetic"] <= ended["loss_pseudo"] else "no"
    assert (f"| sa-cps | 0 | {ended['loss_pseudo']:.3f} | {ended['loss_synthetic']:.3f} | {verdict} |"
            in (tmp_path / "table.md").read_text())


def test_a_finished_run_recorded_again_keeps_its_own_finish_time_and_claims_no_wall_time(tmp_path):
    """A finished run folder recorded into a new record (nothing retrained) is stamped with the time
    its last checkpoint was written, not the re-recording call's, and has no wall time: the call did
    not time any training."""
    import time

    out = tmp_path / "runs"
    first = _bench(out, tmp_path / "first.json", "--methods", "baseline")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    trained = json.loads((tmp_path / "first.json").read_text())["results"]["baseline"][0]
    assert trained["wall_seconds"] > 0
    last = out / "baseline-s0" / "last.pt"
    os.utime(last, (last.stat().st_atime, last.stat().st_mtime - 3 * 3600))  # as if it finished hours ago
    again = _bench(out, tmp_path / "second.json", "--methods", "baseline")
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    row = json.loads((tmp_path / "second.json").read_text())["results"]["baseline"][0]
    assert row["dice"] == trained["dice"]
    assert row["finished"] == time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(last.stat().st_mtime))
    assert row["wall_seconds"] is None and row["load_average"] is None
