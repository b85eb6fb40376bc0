"""`plsynth-infer`: batch-segment CT volumes and slices with a model bundle (the hospital CLI).

A thin shell over `plsynth.deploy.predictor.Predictor`; exit codes come from the one table,
``plsynth.errors.ExitCode``, through ``plsynth.errors.run_app``.
Heavy imports (torch, onnxruntime) happen inside the command so that ``--help`` is instant.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import logging
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from plsynth.data.io import DEFAULT_MAX_VOXELS
from plsynth.deploy import settings
from plsynth.deploy.engines import DEVICES, ENGINES
from plsynth.errors import ExitCode

app = typer.Typer(name="plsynth-infer", add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False)

DEFAULT_OUT = Path("plsynth-out")


@app.command()
def infer(
    inputs: Annotated[list[Path], typer.Argument(help="NIfTI files, DICOM series folders, PNG/JPG slices, or folders of them.", show_default=False)],
    out: Annotated[Path, typer.Option("-o", "--out", help="Output folder.")] = DEFAULT_OUT,
    model: Annotated[Optional[Path], typer.Option("--model", envvar="PLSYNTH_MODEL", help="Model bundle folder [env: PLSYNTH_MODEL].")] = None,
    engine: Annotated[str, typer.Option("--engine", help=" | ".join(ENGINES) + ".")] = ENGINES[0],
    device: Annotated[str, typer.Option("--device", help=" | ".join(DEVICES) + ".")] = DEVICES[0],
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Slices per engine call.")] = settings.BATCH_SIZE,
    lung_backend: Annotated[str, typer.Option("--lung-backend", help="bundle (the back-end the model was trained with) | auto (lungmask when its weights are present, else classical) | lungmask | classical.")] = settings.LUNG_BACKEND,
    overlays: Annotated[bool, typer.Option("--overlays/--no-overlays", help="Write QA overlay PNGs to OUT/overlays.")] = False,
    resume: Annotated[bool, typer.Option("--continue", help="Skip cases a previous run into OUT finished.")] = False,
    allow_fallback: Annotated[bool, typer.Option("--allow-fallback", help="Run on the CPU when the GPU engine asked for is unavailable.")] = False,
    agreement: Annotated[bool, typer.Option("--agreement/--no-agreement", help=f"With two networks in the bundle, report their mask Dice per case (the second network runs on every {settings.AGREEMENT_EVERY}th lung slice).")] = True,
    review_below: Annotated[float, typer.Option("--review-below", help="Mark cases whose two-network Dice is below this for review.")] = settings.REVIEW_BELOW,
    min_size_mm3: Annotated[float, typer.Option("--min-size-mm3", min=0.0, help="Drop infection components smaller than this (volumes).")] = settings.MIN_SIZE_MM3,
    min_size_px: Annotated[int, typer.Option("--min-size-px", min=0, help="Drop infection components smaller than this (2D slices).")] = settings.MIN_SIZE_PX,
    fp16: Annotated[Optional[bool], typer.Option("--fp16/--fp32", help="Precision. Default: bfloat16 with OpenVINO on a CPU with AMX / AVX-512 BF16 (masks near, not equal to, fp32's), fp32 elsewhere; --fp16 also TensorRT FP16 on a GPU; --fp32 full precision everywhere.", show_default=False)] = None,
    threads: Annotated[int, typer.Option("--threads", min=0, help="CPU threads for the engine (0: library default).")] = 0,
    series_uid: Annotated[Optional[str], typer.Option("--series-uid", help="DICOM series to use when a folder holds several.")] = None,
    output_format: Annotated[str, typer.Option("--format", help="DICOM inputs: nifti | dicom-seg | both (SEG: infection and lungs, referencing the series).")] = settings.OUTPUT_FORMATS[0],
    max_voxels: Annotated[int, typer.Option("--max-voxels", min=1, envvar="PLSYNTH_MAX_VOXELS", help="Refuse volumes with more voxels than this, from the header, before reading [env: PLSYNTH_MAX_VOXELS].")] = DEFAULT_MAX_VOXELS,
    verbose: Annotated[bool, typer.Option("--verbose", help="Log engine and case details.")] = False,
) -> None:
    """Segment COVID-19 pneumonia infection in chest CT; masks, report.csv and report.json go to OUT.

    Example: plsynth-infer volumes/ -o results --engine ort --overlays
    """
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for name, value, allowed in (("--engine", engine, ENGINES), ("--device", device, DEVICES),
                                 ("--lung-backend", lung_backend, settings.LUNG_BACKENDS),
                                 ("--format", output_format, settings.OUTPUT_FORMATS)):
        if value not in allowed:
            raise typer.BadParameter(f"{value!r} is not one of {', '.join(allowed)}", param_hint=name)
    if model is None:
        _fail(ExitCode.BUNDLE, "no model bundle: pass --model BUNDLE or set PLSYNTH_MODEL")

    from plsynth.atomic import folder_lock
    from plsynth.data.io import find_cases
    from plsynth.deploy.predictor import Predictor

    cases = find_cases(inputs)
    if not cases:
        _fail(ExitCode.NO_INPUT, f"no cases found in {', '.join(str(p) for p in inputs)}")
    predictor = Predictor.from_bundle(  # BundleError -> 4, EngineUnavailable -> 5 (run_app)
        model, engine=engine, device=device, batch_size=batch_size, allow_fallback=allow_fallback,
        lung_backend=lung_backend, agreement=agreement, threads=threads or None, fp16=fp16,
        min_size_mm3=min_size_mm3, min_size_px=min_size_px, review_below=review_below,
    )
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(folder_lock(out, "plsynth-infer"))  # another run holding OUT -> LockedError, exit 6
        except OSError as exc:  # OUT is a file, not writable, on a read-only file system ...
            _fail(ExitCode.USAGE, f"cannot use output folder {out}: {exc.strerror or exc}")
        failed = _segment(predictor, cases, inputs, out, model, overlays=overlays, series_uid=series_uid, arguments=dict(
            engine=engine, device=device, batch_size=batch_size, lung_backend=lung_backend, resume=resume, fp16=fp16,
            min_size_mm3=min_size_mm3, min_size_px=min_size_px, review_below=review_below, format=output_format,
            max_voxels=max_voxels))
    raise typer.Exit(ExitCode.FAILED if failed else ExitCode.OK)


def _segment(predictor, cases, inputs, out: Path, model: Path, overlays: bool, series_uid: Optional[str],
             arguments: dict) -> int:
    """Run every case, rewriting the reports after each; returns how many failed (or were not reported)."""
    from plsynth.deploy.report import write_reports

    resume = arguments["resume"]
    formats = {"nifti": ("nifti",), "dicom-seg": ("dicom-seg",), "both": ("nifti", "dicom-seg")}[arguments["format"]]
    run_info = {
        "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "arguments": {"inputs": [p.name or str(p) for p in inputs], **{k.replace("resume", "continue"): v
                                                                        for k, v in arguments.items()}},
        "bundle": str(model), "bundle_meta_sha256": predictor.bundle_sha256,
        "engine": predictor.engine_name, "provider": predictor.provider, "lung_backend": predictor.lung_backend,
        "networks": list(predictor.engines), "versions": predictor.versions,
    }
    typer.echo(f"plsynth-infer: {len(cases)} case(s), engine {predictor.engine_name} ({predictor.provider}), "
               f"lungs {predictor.lung_backend}, out {out}", err=True)
    rows: list[dict] = []
    failed = 0
    report_error = None
    progress = _Progress(len(cases))
    started = time.perf_counter()
    try:
        for result in predictor.run(cases, out, overlays=overlays, resume=resume, series_uid=series_uid, formats=formats,
                                     max_voxels=arguments["max_voxels"]):
            rows.append(result.row)
            failed += result.status == "failed"
            progress.step(result)
            run_info["seconds"] = round(time.perf_counter() - started, 3)
            try:
                write_reports(out, rows, run_info)
                report_error = None
            except OSError as exc:  # full disk, permissions: the next case may still fit; say so at the end
                report_error = f"{exc.strerror or exc} ({exc.filename or out})"
    finally:
        progress.close()
    typer.echo(f"plsynth-infer: {len(rows) - failed} ok, {failed} failed; report: {out / 'report.csv'}", err=True)
    if report_error is not None:
        typer.echo(f"plsynth-infer: the report could not be written: {report_error}", err=True)
        return failed + 1
    return failed


class _Progress:
    """A rich progress bar on a terminal; plain one-line-per-case messages otherwise (logs, CI)."""

    def __init__(self, total: int) -> None:
        self.total, self.done, self.bar = total, 0, None
        if sys.stderr.isatty():
            from rich.progress import Progress

            self.bar = Progress(transient=False)
            self.bar.start()
            self.task = self.bar.add_task("segmenting", total=total)

    def step(self, result) -> None:
        self.done += 1
        seconds = result.row.get("seconds")
        line = f"[{self.done}/{self.total}] {result.case}: {result.status}"
        if result.status == "failed":
            line += f": {result.error}"
        elif seconds is not None and result.status == "ok":
            line += f" ({seconds:.1f} s, {result.row.get('percent_involved')} % of lung)"
        if self.bar is not None:
            self.bar.console.print(line)
            self.bar.advance(self.task)
        else:
            typer.echo(line, err=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def _fail(code: int, message: str) -> None:
    typer.echo(f"plsynth-infer: {message}", err=True)
    raise typer.Exit(int(code))


def main() -> None:
    """Console entry point: the documented exit codes (``plsynth.errors.ExitCode``), no traceback unless --verbose."""
    from plsynth.errors import run_app

    sys.exit(run_app(app, "plsynth-infer"))


if __name__ == "__main__":
    main()
