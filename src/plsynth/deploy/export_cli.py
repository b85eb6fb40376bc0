"""`plsynth export --run DIR [--fp16] [--trt]`: a training run's checkpoint -> model bundle (+ TensorRT engine)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer


def export_command(
    run: Annotated[Path, typer.Option("--run", exists=True, file_okay=False, help="Training run folder (best.pt or last.pt).")],
    out: Annotated[Optional[Path], typer.Option("--out", help="Bundle folder; default RUN/bundle.")] = None,
    trt: Annotated[bool, typer.Option("--trt", help="Also build the TensorRT engine into the bundle's engine cache (GPU).")] = False,
    fp16: Annotated[bool, typer.Option("--fp16", help="TensorRT engine in FP16 (with --trt).")] = False,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="TensorRT profile: largest batch.")] = 8,
) -> None:
    """Export a run's networks to ONNX (parity-checked against PyTorch) and optionally TensorRT.

    Example: plsynth export --run runs/sa-cps --trt --fp16
    """
    from plsynth.bundles.segmenter import export_run
    from plsynth.bundles.tensorrt_engine import build_trt_engines

    # BundleError -> 4, EngineUnavailable (--trt without TensorRT or a GPU) -> 5: plsynth.errors.run_app
    bundle = export_run(run, out)
    if trt:
        build_trt_engines(bundle, fp16=fp16, batch_size=batch_size)
    typer.echo(f"bundle: {bundle}")
