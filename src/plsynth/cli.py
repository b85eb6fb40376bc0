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
)
app.add_typer(data_app, name="data", help="Make and inspect data (phantoms).")
app.add_typer(train_app, name="train", help="Train the synthesizer or a segmentation method.")
app.add_typer(synth_app, name="synth", help="Look at what the synthesizer draws.")
app.command("eval")(eval_command)
app.command("export")(export_command)


@app.command("demo")
def demo_command(
    out: str = typer.Option("runs/demo", "--out", help="Folder for data, bundles, masks and the report."),
    config: str = typer.Option("", "--config", help="Preset (default: configs/demo.yaml)."),
    sa_st: bool = typer.Option(True, "--sa-st/--no-sa-st", help="Also train SA-ST from the SA-CPS teacher."),
) -> None:
    """The whole pipeline on phantoms in minutes: synthesizer, baseline, SA-CPS, SA-ST, plsynth-infer, table.

    Example: plsynth demo --out runs/demo
    """
    from pathlib import Path

    from plsynth.demo import run_demo

    run_demo(Path(out), Path(config) if config else None, sa_st=sa_st)


EXIT_CONFIG, EXIT_INPUT, EXIT_BUNDLE = 2, 3, 4


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from plsynth.config import ConfigError
    from plsynth.errors import BundleError, InputError

    try:
        app(standalone_mode=False)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        sys.exit(130)
    except ConfigError as exc:
        typer.echo(f"config error: {exc}", err=True)
        sys.exit(EXIT_CONFIG)
    except InputError as exc:
        typer.echo(f"input error: {exc}", err=True)
        sys.exit(EXIT_INPUT)
    except BundleError as exc:
        typer.echo(f"bundle error: {exc}", err=True)
        sys.exit(EXIT_BUNDLE)
    except Exception as exc:  # click usage errors carry their own exit code
        import click

        if isinstance(exc, click.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        raise


if __name__ == "__main__":
    main()
