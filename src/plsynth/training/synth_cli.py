"""`plsynth synth ...` (owned by the synthesizer stage)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from plsynth.training.cli import ConfigOpt

app = typer.Typer(no_args_is_help=True)


@app.command("preview")
def preview_command(
    synth: Annotated[Path, typer.Option("--synth", exists=True, file_okay=False, help="Synthesizer bundle folder.")],
    config: ConfigOpt,
    out: Annotated[Path, typer.Option("--out", help="PNG gallery to write.")],
    n: Annotated[int, typer.Option("--n", min=1, help="Number of labeled slices (rows).")] = 8,
    run: Annotated[
        Optional[Path], typer.Option("--run", help="Run folder with the config's data cache (default: next to --out).")
    ] = None,
    backend: Annotated[str, typer.Option("--backend", help="Decoder backend: torch or ort.")] = "torch",
    seed: Annotated[int, typer.Option("--seed", help="Seed of the pool draws and noise.")] = 0,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="Dotted config override (repeatable).")] = None,
) -> None:
    """Gallery: map | image | infection removed | image | infection moved | image, per labeled slice.

    Example: plsynth synth preview --synth runs/synth/bundle --config configs/phantom-smoke.yaml --out preview.png
    """
    from plsynth.config import load_config
    from plsynth.data.datasets import build_splits
    from plsynth.training.synth_preview import write_preview

    cfg = load_config(config, set_ or [])
    splits = build_splits(cfg, run or out.parent / f"{out.stem}-data")
    path = write_preview(synth, splits.labeled, out, n=n, seed=seed, backend=backend)
    typer.echo(f"preview: {path}")
