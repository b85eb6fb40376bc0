"""The repository stands alone: split files and presets ship in the package, data roots come from
the config or $PLSYNTH_DATA (with a clear error when absent), removed config keys still load,
and no product file names a path outside the repository."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from plsynth.config import ConfigError, config_from_dict, load_config, presets, saved_config
from plsynth.data.layouts import DATA_ENV, SOURCES, dataset_root
from plsynth.data.splits import paper_split_sets, read_slice_list, read_volume_list, splits_folder
from plsynth.errors import InputError

REPO = Path(__file__).resolve().parents[1]
PACKAGE = Path(__import__("plsynth").__file__).parent
BIN = Path(sys.executable).parent


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_shipped_split_files_are_the_originals_byte_for_byte_and_read_the_same(splits_root):
    originals = sorted(p.relative_to(splits_root) for p in splits_root.glob("*/*.csv"))
    assert len(originals) == 16 and paper_split_sets() == ["covid19-20", "mosmeddata"]
    shipped = sorted(p.relative_to(PACKAGE / "data" / "paper_splits") for p in (PACKAGE / "data" / "paper_splits").glob("*/*.csv"))
    assert shipped == originals
    for rel in originals:
        ours = splits_folder(rel.parts[0]) / rel.name
        assert _sha256(ours) == _sha256(splits_root / rel), rel
        read = read_volume_list if rel.name.endswith("_volume.csv") else read_slice_list
        assert read(ours) == read(splits_root / rel), rel


def test_splits_dir_names_a_shipped_set_or_a_folder(tmp_path, monkeypatch):
    from plsynth.data.datasets import _split_files

    cfg = load_config("covid19-20-10")
    files = _split_files(cfg)
    assert files["labeled_split"] == PACKAGE / "data" / "paper_splits" / "covid19-20" / "train_0.1_l.csv"
    assert sum(map(len, read_slice_list(files["labeled_split"]).values())) == 1194
    # A value with a folder part is a path, even if its last part is a shipped set's name.
    monkeypatch.chdir(tmp_path)
    assert splits_folder("./covid19-20") == Path("covid19-20")
    with pytest.raises(InputError, match="data.labeled_split not found"):
        _split_files(load_config("covid19-20-10", ["data.splits_dir=./covid19-20"]))


def test_data_root_comes_from_the_config_else_plsynth_data(tmp_path, monkeypatch):
    (tmp_path / "covid-semiseg").mkdir()
    monkeypatch.setenv(DATA_ENV, str(tmp_path))
    assert dataset_root("semiseg") == tmp_path / "covid-semiseg"
    assert dataset_root("semiseg", str(tmp_path)) == tmp_path  # data.root wins
    with pytest.raises(InputError, match=r"mosmeddata.*mosmed\.ai"):
        dataset_root("mosmed")  # the variable is set, the dataset's folder is not there
    monkeypatch.delenv(DATA_ENV)
    for layout, source in SOURCES.items():
        with pytest.raises(InputError, match=f"{DATA_ENV} is not set") as err:
            dataset_root(layout)
        assert source.where.split()[0] in str(err.value) and source.folder in str(err.value)


@pytest.mark.parametrize("env", ["unset", "missing"])
def test_training_without_the_dataset_exits_3_saying_where_to_get_it(tmp_path, env):
    """The installed console script, as a user runs it: one line, exit 3, no traceback."""
    environ = {k: v for k, v in os.environ.items() if k != DATA_ENV}
    if env == "missing":
        environ[DATA_ENV] = str(tmp_path / "nowhere")
    proc = subprocess.run([str(BIN / "plsynth"), "train", "baseline", "--config", "semiseg-cpu", "--out", str(tmp_path / "run")],
                          env=environ, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 3, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "COVID-SemiSeg" in proc.stderr and "github.com/DengPingFan/Inf-Net" in proc.stderr
    assert (str(tmp_path / "nowhere" / "covid-semiseg") if env == "missing" else f"{DATA_ENV} is not set") in proc.stderr


def test_presets_ship_in_the_package_and_configs_is_the_same_folder():
    assert (REPO / "configs").resolve() == (PACKAGE / "configs").resolve()
    assert {"demo", "phantom-smoke", "semiseg-cpu", "covid19-20-10", "mosmed-40"} <= set(presets())
    by_name, by_path = load_config("phantom-smoke"), load_config(REPO / "configs" / "phantom-smoke.yaml")
    assert by_name.replace(source="") == by_path.replace(source="")
    with pytest.raises(ConfigError, match="no such preset.*phantom-smoke"):
        load_config("phantom-smok")
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config("phantom-smoke.yaml")  # a suffix makes it a path (here: none in the cwd)


def test_removed_keys_warn_and_load(tmp_path):
    from plsynth.training.checkpoint import config_differences

    old = load_config("phantom-smoke").to_dict()
    old["train"]["num_workers"] = 4
    old["synth"]["backend"] = "trt"
    old["synth"]["lambda_texture"] = 1.0  # one landed version had it
    old["synth"]["l1_pool"] = 8  # and so did another
    old["synth"]["oasis_feat"] = True  # and a third
    old["synth"].update(diffaugment="color,translation,cutout", ema=0.99)  # and a fourth
    old["synth"].update(patch_layers=2, lambda_patch=1.0)  # and a fifth
    old["synth"].update(wall=False, infection_vessels=False, padding="zeros")  # switches removed at their defaults
    with pytest.warns(UserWarning) as caught:
        cfg = config_from_dict(old, where="old checkpoint")
    messages = " ".join(str(w.message) for w in caught)
    assert "train.num_workers" in messages and "synth.backend: trt" in messages and "synth.lambda_texture" in messages
    assert "synth.l1_pool" in messages and "synth.wall" in messages and "synth.padding" in messages
    assert "synth.oasis_feat" in messages and "synth.diffaugment" in messages and "synth.ema" in messages
    assert "synth.patch_layers" in messages and "synth.lambda_patch" in messages
    assert cfg.synth.backend == "torch" and not hasattr(cfg.train, "num_workers")
    assert old["train"]["num_workers"] == 4  # the caller's dict is left as it was
    # An old checkpoint holding the removed key still resumes under today's config.
    assert config_differences(old, cfg.to_dict()) == ["synth.backend: 'trt' -> 'torch'"]
    # A stored copy (bundle, checkpoint) loads without a warning: plsynth-infer users cannot edit it.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert saved_config(old, where="old bundle") == cfg
    (tmp_path / "c.yaml").write_text("train:\n  num_workers: 2\n")
    with pytest.warns(UserWarning, match="num_workers"):
        load_config(tmp_path / "c.yaml")
    # A removed switch that was on cannot be dropped: the run or bundle drew something else.
    (tmp_path / "w.yaml").write_text("synth:\n  vessels: true\n  wall: true\n")
    with pytest.raises(ConfigError, match=r"w\.yaml: synth\.wall: True: the chest wall .* not kept"):
        load_config(tmp_path / "w.yaml")
    with pytest.raises(ConfigError, match="synth.padding: 'reflect'"):
        saved_config({**old, "synth": {**old["synth"], "padding": "reflect"}}, where="old bundle")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_config("phantom-smoke")  # the presets hold no removed key


def test_a_run_saved_before_a_key_existed_resumes_when_the_key_is_at_its_default():
    """A switch added later (off by default, as the older code behaved) must not stop an older run
    from resuming; set to anything else, it is a real difference."""
    from plsynth.training.checkpoint import config_differences

    cfg = load_config("phantom-smoke")
    old = cfg.to_dict()
    del old["synth"]["vessels"]  # saved before synth.vessels existed
    assert config_differences(old, cfg.to_dict()) == []
    on = cfg.replace(synth=dataclasses.replace(cfg.synth, vessels=True))
    assert config_differences(old, on.to_dict()) == ["synth.vessels: None -> True"]


OUTSIDE = re.compile(r"\.\./shared|/work/|paper\.txt|reference-code-review|environment-notes|field-anchors|shared/data|shared/docs")


def test_no_product_file_names_a_path_outside_the_repository():
    """Tests reach real data only through conftest.py's fixtures, which this check leaves out (and itself)."""
    files = [REPO / name for name in ("README.md", "BENCHMARKS.md", "Dockerfile", "Makefile", "pyproject.toml", ".rayignore")]
    files += [p for p in (REPO / "tests").glob("*.py") if p.name not in ("conftest.py", Path(__file__).name)]
    for folder in ("src", "docs", "bench", "docker", ".ci"):
        files += [p for p in (REPO / folder).rglob("*") if p.is_file() and p.suffix in (".py", ".md", ".yaml", ".sh", ".json", ".toml", "")]
    hits = [f"{p.relative_to(REPO)}:{i}: {line.strip()[:100]}" for p in files if p.is_file() and "egg-info" not in str(p)
            for i, line in enumerate(p.read_text(errors="replace").splitlines(), 1) if OUTSIDE.search(line)]
    assert not hits, "\n".join(hits)
