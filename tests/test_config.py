from pathlib import Path

import pytest

from plsynth.config import Config, ConfigError, config_from_dict, load_config, saved_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads(path: Path) -> None:
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    assert cfg.source == str(path)


def test_unknown_key_names_file_and_key(tmp_path: Path) -> None:
    f = tmp_path / "bad.yaml"
    f.write_text("optim:\n  lrr: 0.1\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*optim\.lrr"):
        load_config(f)


def test_bad_value_names_the_field(tmp_path: Path) -> None:
    f = tmp_path / "bad.yaml"
    f.write_text("optim:\n  lr: -1\n")
    with pytest.raises(ConfigError, match="optim.lr must be > 0"):
        load_config(f)


def test_wrong_type_and_literal_are_rejected(tmp_path: Path) -> None:
    f = tmp_path / "bad.yaml"
    f.write_text("train:\n  epochs: many\n")
    with pytest.raises(ConfigError, match="train.epochs must be int"):
        load_config(f)
    f.write_text("data:\n  layout: dicomdir\n")
    with pytest.raises(ConfigError, match="data.layout must be one of"):
        load_config(f)
    f.write_text("model:\n  norm: group\n")
    with pytest.raises(ConfigError, match="model.norm must be one of"):
        load_config(f)


def test_dotted_overrides_apply_and_round_trip(tmp_path: Path) -> None:
    f = tmp_path / "ok.yaml"
    f.write_text("train:\n  epochs: 3\n")
    cfg = load_config(f, ["optim.lr=0.005", "data.window_hu=[-1000, 400]", "train.method=sa-cps"])
    assert cfg.optim.lr == 0.005 and cfg.train.epochs == 3 and cfg.train.method == "sa-cps"
    assert cfg.data.window_hu == (-1000.0, 400.0)
    assert config_from_dict(cfg.to_dict()) == cfg


def test_paper_defaults() -> None:
    cfg = Config()
    assert (cfg.optim.lr, cfg.optim.momentum, cfg.optim.poly_power) == (1e-2, 0.9, 0.9)
    assert (cfg.train.tau, cfg.train.lam, cfg.train.mu) == (0.5, 0.5, 0.5)
    assert (cfg.train.batch_labeled, cfg.train.batch_unlabeled) == (8, 8)
    assert cfg.data.window_hu == (-1250.0, 250.0) and cfg.data.image_size == 512
    assert cfg.synth.pool_k == 10 and cfg.synth.style_dim == 512


def test_a_config_saved_before_model_norm_existed_means_batch_norm() -> None:
    saved = Config().to_dict()
    del saved["model"]["norm"]
    assert saved_config(saved, where="old/meta.json").model.norm == "batch"
    assert saved_config(Config().to_dict(), where="new/meta.json").model.norm == "instance"
    assert config_from_dict(saved).model.norm == "instance"  # a YAML without the key gets the default


def test_val_every_of_older_configs_still_loads_and_other_values_say_what_replaced_them() -> None:
    saved = Config().to_dict()
    del saved["train"]["val_every_iters"]
    saved["train"]["val_every"] = 1  # what every checkpoint and bundle before 2026-12-02 holds
    assert saved_config(saved, where="old/meta.json").train.val_every_iters == 0  # = every epoch, as before
    replaced = r"old.yaml: train.val_every \(3 epochs\) was replaced by train.val_every_iters"
    with pytest.raises(ConfigError, match=replaced):
        config_from_dict({"train": {"val_every": 3}}, where="old.yaml")
