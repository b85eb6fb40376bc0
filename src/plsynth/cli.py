"""`plsynth`: the researcher's command line. Each stage owns its sub-commands; this file only
assembles them and maps exceptions to exit codes in one place.

Heavy imports (torch, ray, onnxruntime) live inside the commands so that `--help` is instant.
"""

from __future__ import annotations

import logging
import sys

import typer

from plsynth.data.cli import app as data_app
from plsynth.deploy.export_cli import export_command
from plsynth.training.cli import eval_command, train_app
from plsynth.training.synth_cli import app as synth_app

app = typer.Typer(
    name="plsynth",
    help="Train and compare semi-supervised COVID-19 infection segmenters with pseudo-label guided image synthesis.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.add_typer(data_app, name="data", help="Make and inspect data (phantoms).")
app.add_typer(train_app, name="train", help="Train the synthesizer or a segmentation method.")
app.add_typer(synth_app, name="synth", help="Look at what the synthesizer draws.")
app.command("eval")(eval_command)
app.command("export")(export_command)


@app.command("demo")
def demo_command(
    out: str = typer.Option("runs/demo", "--out", help="Folder for data, bundles, masks and the report."),
    config: str = typer.Option("demo", "--config", help="Preset name (demo, phantom-smoke, ...) or YAML file."),
    sa_st: bool = typer.Option(True, "--sa-st/--no-sa-st", help="Also train SA-ST from the SA-CPS teacher."),
) -> None:
    """The whole pipeline on phantoms in minutes: synthesizer, baseline, SA-CPS, SA-ST, plsynth-infer, table.

    Example: plsynth demo --out runs/demo
    """
    from pathlib import Path

    from plsynth.demo import run_demo

    run_demo(Path(out), config, sa_st=sa_st)


@app.callback()
def _options(verbose: bool = typer.Option(False, "--verbose", help="Print the traceback of an unexpected error.")) -> None:
    """Train and compare semi-supervised COVID-19 infection segmenters with pseudo-label guided image synthesis."""


def main() -> None:
    """Console entry point: the documented exit codes (``plsynth.errors.ExitCode``), no traceback unless --verbose."""
    from plsynth.errors import run_app

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sys.exit(run_app(app, "plsynth"))


if __name__ == "__main__":
    main()
