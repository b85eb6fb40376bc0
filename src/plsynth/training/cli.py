"""`plsynth train ...` and `plsynth eval`: thin shells over the training functions."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

train_app = typer.Typer(no_args_is_help=True)



def _preset_or_file(value: Path | None) -> Path | None:
    """--config is a shipped preset's name or an existing file; anything else is a usage error (exit 2)."""
    from plsynth.config import ConfigError, config_path

    if value is None:
        return value
    try:
        found = config_path(value)
    except ConfigError as exc:
        raise typer.BadParameter(str(exc)) from None
    if not found.is_file():
        raise typer.BadParameter(f"{value}: no such file (or a preset name without folder and suffix)")
    return value


ConfigOpt = Annotated[Path, typer.Option("--config", dir_okay=False, callback=_preset_or_file,
                                         help="Preset name (e.g. phantom-smoke) or YAML file.")]
OutOpt = Annotated[Path, typer.Option("--out", help="Run folder (checkpoints, logs, bundle/).")]
SetOpt = Annotated[
    Optional[list[str]], typer.Option("--set", help="Dotted override, e.g. --set optim.lr=0.005 (repeatable).")
]
DeviceOpt = Annotated[
    Optional[str], typer.Option("--device", help="auto (CUDA when there is a GPU, else CPU), cuda or cpu; "
                                "default train.device. AMP on CUDA: train.amp.")
]


def _load(config: Path, overrides: Optional[list[str]], method: str | None = None, device: str | None = None):
    import dataclasses

    from plsynth.config import load_config
    from plsynth.torch_setup import flush_denormals
    from plsynth.training.loop import select_device

    flush_denormals()  # before the first parallel op creates torch's thread pool (see torch_setup)
    cfg = load_config(config, [*(overrides or []), *([f"train.device={device}"] if device else [])])
    if method is not None:
        cfg = cfg.replace(train=dataclasses.replace(cfg.train, method=method))
    select_device(cfg.train.device)  # --device cuda without a GPU: a usage error now, not after data prep
    return cfg


@train_app.command("synthesizer")
def train_synthesizer_command(config: ConfigOpt, out: OutOpt, set_: SetOpt = None, device: DeviceOpt = None) -> None:
    """Train the SEAN synthesizer on the labeled training slices and build its style pool.

    Example: plsynth train synthesizer --config configs/phantom-smoke.yaml --out runs/synth
    """
    from plsynth.atomic import folder_lock
    from plsynth.training.synthesizer import train_synthesizer

    cfg = _load(config, set_, device=device)
    with folder_lock(out, "plsynth train synthesizer"):  # a second run into OUT: exit 6
        bundle = train_synthesizer(cfg, out)
    typer.echo(f"synthesizer bundle: {bundle}")


def _method_command(method: str):
    def command(config: ConfigOpt, out: OutOpt, set_: SetOpt = None, device: DeviceOpt = None) -> None:
        from plsynth.atomic import folder_lock
        from plsynth.training.loop import train

        cfg = _load(config, set_, method, device)
        with folder_lock(out, f"plsynth train {method}"):  # a second run into OUT: exit 6
            bundle = train(cfg, out).bundle
        typer.echo(f"{method} bundle: {bundle}")

    command.__doc__ = f"""Train `{method}` and leave its bundle in OUT/bundle (resumes from OUT/last.pt).

    Example: plsynth train {method} --config configs/phantom-smoke.yaml --out runs/{method}
    """
    return command


for _method in ("baseline", "cps", "sa-cps", "st", "sa-st"):
    train_app.command(_method)(_method_command(_method))


def eval_command(
    model: Annotated[Path, typer.Option("--model", exists=True, file_okay=False, help="Model bundle folder.")],
    config: ConfigOpt,
    out: Annotated[Optional[Path], typer.Option("--out", help="Where to write metrics.csv / metrics.json.")] = None,
    split: Annotated[str, typer.Option("--split", help="Which split of the config's data to score: val or test.")] = "val",
    set_: SetOpt = None,
) -> None:
    """Score a bundle on held-out data: per-case and mean DSC and NSD.

    Example: plsynth eval --model runs/sa-cps/bundle --config configs/phantom-smoke.yaml
    """
    from plsynth.training.evaluate import evaluate_bundle, format_table

    result = evaluate_bundle(model, _load(config, set_), split=split, out=out)
    typer.echo(format_table(result["per_case"], result))
