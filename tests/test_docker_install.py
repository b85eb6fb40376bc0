"""The Docker image's install and entry-point steps (docker/install.sh), run as CI can run them:
in a fresh virtual environment, as a non-root user, with no network.

No Docker engine runs here, so the image itself is never built; this test runs the script the
Dockerfile runs. To stay cheap it installs plsynth alone (``--no-deps``) into a new venv whose
dependencies come from the project's .venv through a .pth file, instead of downloading them.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "docker" / "install.sh"

pytestmark = pytest.mark.slow


def _as_user(python: str) -> list[str]:
    """A prefix that runs a command as ``nobody`` when we are root.

    Where root's interpreter or the project's environment is unreadable for ``nobody`` (e.g. a
    pyenv Python under /root), dropping privileges is impossible and the steps run as the
    current user, with a warning: the install and entry-point checks still run.
    """
    if os.geteuid() != 0:
        return []
    runuser = shutil.which("runuser")
    prefix = [runuser, "-u", "nobody", "--"] if runuser else []
    probe = [*prefix, python, "-c", "import onnxruntime, torch"] if prefix else None
    if probe and subprocess.run(probe, capture_output=True, timeout=120).returncode == 0:
        return prefix
    import warnings

    warnings.warn("cannot run as a non-root user here (interpreter or .venv unreadable for nobody); running as root")
    return []


def test_install_script_installs_plsynth_and_checks_the_entry_point_as_non_root(tmp_path: Path):
    work = tmp_path / "w"
    work.mkdir()
    src = work / "src"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(".venv", ".git", "runs", "*.egg-info", "__pycache__", ".pytest_cache", "cache"))
    os.chmod(tmp_path, 0o755)
    for root, dirs, files in os.walk(work):
        os.chmod(root, 0o777)
        for name in files:
            os.chmod(os.path.join(root, name), 0o666 | (os.stat(os.path.join(root, name)).st_mode & 0o111))
    venv = work / "venv"
    base_python = getattr(sys, "_base_executable", sys.executable)
    prefix = _as_user(sys.executable)
    subprocess.run([*prefix, base_python, "-m", "venv", str(venv)], check=True, timeout=120)
    # dependencies from the project's environment (no network), plsynth itself from the script
    purelib = sysconfig.get_paths()["purelib"]
    new_site = next((venv / "lib").glob("python3*/site-packages"))
    (new_site / "deps.pth").write_text(purelib + "\n")
    env = {"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "PYTHON": str(venv / "bin" / "python"), "HOME": str(work / "home"),
           "PIP_NO_INDEX": "1", "PIP_NO_CACHE_DIR": "1", "MPLCONFIGDIR": str(work / "mpl"),
           "PYTHONPATH": purelib}  # the build backend (setuptools, wheel) from .venv, ahead of the venv's own
    result = subprocess.run([*prefix, "bash", str(src / "docker" / "install.sh"), str(src), "--variant", "cpu", "--no-deps"],
                            env=env, capture_output=True, text=True, encoding="utf-8", timeout=600, cwd=work)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "install.sh: ok" in result.stdout
    installed = subprocess.run([str(venv / "bin" / "python"), "-c", "import plsynth, sys; print(plsynth.__file__)"],
                               env=env, capture_output=True, text=True, encoding="utf-8", timeout=60)
    assert str(venv) in installed.stdout, "plsynth must come from the new venv, not the source tree"
    # nothing of ours in $HOME; onnxruntime >= 1.32 itself writes a device id under
    # ~/.cache/Microsoft on import, which the image points at /tmp
    written = [p for p in (work / "home").rglob("*") if p.is_file()] if (work / "home").exists() else []
    assert all("Microsoft" in p.parts for p in written), written
