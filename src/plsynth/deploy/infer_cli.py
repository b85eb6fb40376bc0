"""`plsynth-infer`: batch-segment CT volumes and slices with a model bundle (the hospital CLI).

A thin shell over `plsynth.deploy.predictor.Predictor`; exit codes are mapped here, in one place.
Heavy imports (torch, onnxruntime) happen inside the command so that ``--help`` is instant.
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

EXIT_OK = 0
EXIT_CASES_FAILED = 1  # some cases failed; the others were written
EXIT_USAGE = 2  # bad arguments (Typer/Click's own code)
EXIT_NO_INPUT = 3  # no case found in the inputs
EXIT_BUNDLE = 4  # model bundle missing, damaged or tampered with
EXIT_ENGINE = 5  # a GPU engine (trt, or --device cuda) was asked for and not obtained
EXIT_INTERRUPTED = 130

EXIT_INTERNAL = 70  # a bug: the traceback is printed (EX_SOFTWARE)

app = typer.Typer(name="plsynth-infer", add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False)

DEFAULT_OUT = Path("plsynth-out")


@app.command()
def infer(
    inputs: Annotated[list[Path], typer.Argument(help="NIfTI files, DICOM series folders, PNG/JPG slices, or folders of them.", show_default=False)],
    out: Annotated[Path, typer.Option("-o", "--out", help="Output folder.")] = DEFAULT_OUT,
    model: Annotated[Optional[Path], typer.Option("--model", envvar="PLSYNTH_MODEL", help="Model bundle folder [env: PLSYNTH_MODEL].")] = None,
    engine: Annotated[str, typer.Option("--engine", help="auto | trt | ort | torch.")] = "auto",
    device: Annotated[str, typer.Option("--device", help="auto | cuda | cpu.")] = "auto",
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Slices per engine call.")] = 8,
    lung_backend: Annotated[str, typer.Option("--lung-backend", help="bundle (the back-end the model was trained with) | auto (lungmask when its weights are present, else classical) | lungmask | classical.")] = "bundle",
    overlays: Annotated[bool, typer.Option("--overlays/--no-overlays", help="Write QA overlay PNGs to OUT/overlays.")] = False,
    resume: Annotated[bool, typer.Option("--continue", help="Skip cases a previous run into OUT finished.")] = False,
    allow_fallback: Annotated[bool, typer.Option("--allow-fallback", help="Run on the CPU when the GPU engine asked for is unavailable.")] = False,
    agreement: Annotated[bool, typer.Option("--agreement/--no-agreement", help="With two networks in the bundle, report their mask Dice per case.")] = True,
    review_below: Annotated[float, typer.Option("--review-below", help="Mark cases whose two-network Dice is below this for review.")] = 0.8,
    min_size_mm3: Annotated[float, typer.Option("--min-size-mm3", min=0.0, help="Drop infection components smaller than this (volumes).")] = 10.0,
    min_size_px: Annotated[int, typer.Option("--min-size-px", min=0, help="Drop infection components smaller than this (2D slices).")] = 10,
    fp16: Annotated[bool, typer.Option("--fp16", help="TensorRT: build/use an FP16 engine.")] = False,
    threads: Annotated[int, typer.Option("--threads", min=0, help="CPU threads for the engine (0: library default).")] = 0,
    series_uid: Annotated[Optional[str], typer.Option("--series-uid", help="DICOM series to use when a folder holds several.")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", help="Log engine and case details.")] = False,
) -> None:
    """Segment COVID-19 pneumonia infection in chest CT; masks, report.csv and report.json go to OUT.

    Example: plsynth-infer volumes/ -o results --engine ort --overlays
    """
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for name, value, allowed in (("--engine", engine, ("auto", "trt", "ort", "torch")), ("--device", device, ("auto", "cuda", "cpu")),
                                 ("--lung-backend", lung_backend, ("bundle", "auto", "lungmask", "classical"))):
        if value not in allowed:
            raise typer.BadParameter(f"{value!r} is not one of {', '.join(allowed)}", param_hint=name)
    if model is None:
        _fail(EXIT_BUNDLE, "no model bundle: pass --model BUNDLE or set PLSYNTH_MODEL")

    from plsynth.data.io import find_cases
    from plsynth.deploy.engines import EngineUnavailable
    from plsynth.deploy.predictor import Predictor
    from plsynth.deploy.report import write_reports
    from plsynth.errors import BundleError
    from plsynth.torch_setup import flush_denormals

    flush_denormals()  # before the first parallel op creates torch's thread pool

    cases = find_cases(inputs)
    if not cases:
        _fail(EXIT_NO_INPUT, f"no cases found in {', '.join(str(p) for p in inputs)}")
    try:
        predictor = Predictor.from_bundle(
            model, engine=engine, device=device, batch_size=batch_size, allow_fallback=allow_fallback,
            lung_backend=lung_backend, agreement=agreement, threads=threads or None, fp16=fp16,
            min_size_mm3=min_size_mm3, min_size_px=min_size_px, review_below=review_below,
        )
    except BundleError as exc:
        _fail(EXIT_BUNDLE, f"bundle error: {exc}")
    except EngineUnavailable as exc:
        _fail(EXIT_ENGINE, f"engine unavailable: {exc}")

    out.mkdir(parents=True, exist_ok=True)
    run_info = {
        "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "arguments": {"inputs": [p.name or str(p) for p in inputs], "engine": engine, "device": device,
                      "batch_size": batch_size, "lung_backend": lung_backend, "continue": resume, "fp16": fp16,
                      "min_size_mm3": min_size_mm3, "min_size_px": min_size_px, "review_below": review_below},
        "bundle": str(model), "bundle_meta_sha256": predictor.bundle.meta_sha256(),
        "engine": predictor.engine_name, "provider": predictor.provider, "lung_backend": predictor.lung_backend,
        "networks": list(predictor.engines), "versions": predictor.versions,
    }
    typer.echo(f"plsynth-infer: {len(cases)} case(s), engine {predictor.engine_name} ({predictor.provider}), "
               f"lungs {predictor.lung_backend}, out {out}", err=True)
    rows: list[dict] = []
    failed = 0
    progress = _Progress(len(cases))
    started = time.perf_counter()
    try:
        for result in predictor.run(cases, out, overlays=overlays, resume=resume, series_uid=series_uid):
            rows.append(result.row)
            failed += result.status == "failed"
            progress.step(result)
            run_info["seconds"] = round(time.perf_counter() - started, 3)
            write_reports(out, rows, run_info)
    finally:
        progress.close()
    typer.echo(f"plsynth-infer: {len(rows) - failed} ok, {failed} failed; report: {out / 'report.csv'}", err=True)
    raise typer.Exit(EXIT_CASES_FAILED if failed else EXIT_OK)


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
    raise typer.Exit(code)


def main() -> None:
    """Console entry point: runs the app and turns exceptions into the documented exit codes."""
    import click

    try:
        code = app(standalone_mode=False, prog_name="plsynth-infer")  # click returns Exit's code instead of raising it here
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(EXIT_USAGE)
    except (click.exceptions.Abort, KeyboardInterrupt):
        sys.exit(EXIT_INTERRUPTED)
    except Exception:  # noqa: BLE001 - a bug, not a bad input: show it, with its own exit code
        import traceback

        traceback.print_exc()
        sys.exit(EXIT_INTERNAL)
    sys.exit(code if isinstance(code, int) else EXIT_OK)


if __name__ == "__main__":
    main()
