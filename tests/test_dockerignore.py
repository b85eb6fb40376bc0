"""The image build context: no .git, virtual environment or run folder (patient data, checkpoints) gets in."""

from __future__ import annotations

import fnmatch
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _excluded(path: str, patterns: list[str]) -> bool:
    """Docker's rule, enough for these patterns: the last matching line wins; ``!`` re-includes."""
    excluded = False
    parts = path.split("/")
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(fnmatch.fnmatch(p, pattern) or fnmatch.fnmatch(p, pattern.replace("/**", "/*")) for p in prefixes):
            excluded = not negate
    return excluded


def test_dockerignore_keeps_history_venv_and_run_data_out_but_lets_a_bundle_in():
    lines = [l.strip() for l in (REPO / ".dockerignore").read_text().splitlines()]
    patterns = [l for l in lines if l and not l.startswith("#")]
    for path in (".git/config", ".venv/bin/python", "runs/demo/data/cache/0.npy", "runs/demo/last.pt",
                 "runs/demo/bundle/cache/engine.plan", "tests/test_io.py"):
        assert _excluded(path, patterns), path
    for path in ("src/plsynth/cli.py", "pyproject.toml", "README.md", "docker/install.sh",
                 "runs/sa-cps/bundle/meta.json", "runs/sa-cps/bundle/model.onnx"):
        assert not _excluded(path, patterns), path
    dockerfile = (REPO / "Dockerfile").read_text()
    assert "COPY . " not in dockerfile, "copy only what the install needs"
