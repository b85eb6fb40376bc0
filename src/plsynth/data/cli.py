"""`plsynth data ...` (owned by the data stage)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(no_args_is_help=True)


@app.command("phantom")
def phantom_command(
    out: Annotated[Path, typer.Option("--out", help="Folder to write <name>_{ct,seg,lung}.nii.gz into.")],
    n: Annotated[int, typer.Option("--n", min=1, help="Number of volumes.")] = 8,
    seed: Annotated[int, typer.Option("--seed", help="Random seed (same seed, same volumes).")] = 0,
    shape: Annotated[tuple[int, int, int], typer.Option("--shape", help="Slices, rows, columns per volume.")] = (24, 128, 128),
) -> None:
    """Write synthetic chest CT phantoms (HU, infection and lung masks) in the COVID-19-20 layout.

    Example: plsynth data phantom --out data/phantoms --n 8 --seed 0 --shape 24 128 128
    """
    from plsynth.data.phantom import write_phantom_dataset

    paths = write_phantom_dataset(out, n=n, seed=seed, shape=shape)
    typer.echo(f"{len(paths)} phantom volumes in {out}")
