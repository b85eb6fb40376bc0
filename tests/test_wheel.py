"""A wheel built from the repository runs without the source tree.

The wheel is installed into a fresh virtual environment outside the checkout, and `plsynth demo`
and `plsynth-infer` run there from another folder, so presets, split files and every other
resource must come from the installed package. To stay cheap (no network, no 2 GB install), the
new venv borrows the heavy dependencies from the environment running the tests through a .pth
line (a folder added that way has its own .pth files, such as an editable plsynth, ignored), and
PYTHONPATH is cleared, so the only plsynth it can import is the wheel's.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# The demo at a preset smaller than phantom-smoke: the test checks that the installed package
# runs end to end, not what it learns.
TINY = """name: wheel-tiny
data: {layout: phantom, phantom_n: 4, phantom_seed: 0, phantom_shape: [8, 64, 64], image_size: 32,
       val_fraction: 0.25, labeled_fraction: 0.5}
model: {width: 4, depth: 2}
synth: {image_size: 32, width: 8, style_dim: 8, num_up: 3, epochs: 1, batch_size: 4, pool_k: 2, discriminator: patch}
train: {epochs: 1, batch_labeled: 2, batch_unlabeled: 2}
"""


def _run(cmd: list[str], env: dict[str, str], cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd[:3]} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def test_wheel_runs_demo_and_plsynth_infer_without_the_source_tree(tmp_path: Path):
    started = time.perf_counter()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PLSYNTH_DATA")}
    env.update(PIP_NO_INDEX="1", PIP_NO_CACHE_DIR="1", HOME=str(tmp_path / "home"), MPLCONFIGDIR=str(tmp_path / "mpl"),
               OMP_NUM_THREADS="1", RAY_AUTH_MODE="disabled")
    # Build from a copy, so setuptools' build/ and *.egg-info never land in the checkout.
    src = tmp_path / "src"
    shutil.copytree(REPO, src, symlinks=True, ignore=shutil.ignore_patterns(
        ".git", ".venv", "runs", "cache", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache"))
    _run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w", tmp_path / "dist", src],
         env, tmp_path)
    (wheel,) = (tmp_path / "dist").glob("plsynth-*.whl")
    shutil.rmtree(src)  # from here on no source tree exists but the one the tests run from

    venv = tmp_path / "venv"
    _run([getattr(sys, "_base_executable", sys.executable), "-m", "venv", "--without-pip", venv], env, tmp_path)
    python = venv / "bin" / "python"
    _run([sys.executable, "-m", "pip", "--python", python, "install", "--quiet", "--no-deps", wheel], env, tmp_path)
    site = next((venv / "lib").glob("python3*/site-packages"))
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    work = tmp_path / "elsewhere"
    work.mkdir()
    where = _run([python, "-c", "import plsynth; print(plsynth.__file__)"], env, work).stdout.strip()
    assert Path(where).is_relative_to(site), f"plsynth imported from {where}, not from the venv"
    assert not Path(where).is_relative_to(REPO)

    (work / "tiny.yaml").write_text(TINY)
    demo = _run([venv / "bin" / "plsynth", "demo", "--config", "tiny.yaml", "--no-sa-st", "--out", "demo"], env, work)
    assert "| baseline |" in demo.stdout and "| sa-cps |" in demo.stdout
    assert (work / "demo" / "summary.json").is_file() and (work / "demo" / "sa-cps" / "bundle" / "meta.json").is_file()

    # The hospital CLI on a phantom it has never seen, with the demo's SA-CPS bundle.
    _run([venv / "bin" / "plsynth", "data", "phantom", "--out", "scan", "--n", "1", "--seed", "77", "--shape", "8", "64", "64"],
         env, work)
    (ct,) = (work / "scan").glob("*_ct.nii.gz")
    _run([venv / "bin" / "plsynth-infer", ct, "-o", "masks", "--model", "demo/sa-cps/bundle", "--engine", "ort",
          "--lung-backend", "classical"], env, work)
    assert (work / "masks" / ct.name).is_file() and (work / "masks" / "report.csv").is_file()

    # A preset by name resolves inside the installed package too.
    shown = _run([python, "-c", "from plsynth.config import config_path; print(config_path('phantom-smoke'))"], env, work)
    assert Path(shown.stdout.strip()).is_relative_to(site)
    print(f"wheel test: {time.perf_counter() - started:.0f} s")
