"""`plsynth demo`: the whole product on phantoms it makes itself, in minutes on a laptop CPU.

Order of the stages is the researcher's and then the hospital's:
phantoms -> synthesizer (+ gallery) -> baseline -> SA-CPS -> SA-ST (student of the SA-CPS
teacher) -> `plsynth-infer` on held-out phantom volumes with each bundle -> DSC/NSD table.
Every stage is the same code the paper presets run; only the preset (``demo``, shipped in the package) is tiny.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import subprocess
import sys
import time
from pathlib import Path

from plsynth.config import Config, load_config

log = logging.getLogger(__name__)

HOLDOUT_SEED = 10_000  # held-out phantoms are drawn from seeds no training volume uses
HOLDOUT_N = 3


def _stage(title: str) -> float:
    print(f"\n== {title}", flush=True)
    return time.perf_counter()


def _done(started: float, what: str) -> None:
    print(f"   {what} ({time.perf_counter() - started:.0f} s)", flush=True)


def _with_method(cfg: Config, method: str, **train: object) -> Config:
    return cfg.replace(train=dataclasses.replace(cfg.train, method=method, **train))


def run_demo(out: Path, config: str | Path = "demo", sa_st: bool = True) -> dict:
    """Run every stage into ``out`` and return the held-out table (also printed and saved)."""
    from plsynth.data.phantom import write_phantom_dataset
    from plsynth.torch_setup import flush_denormals
    from plsynth.training.loop import train
    from plsynth.training.synthesizer import train_synthesizer

    flush_denormals()  # before the first parallel op creates torch's thread pool (see torch_setup)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = load_config(config)  # a preset name or a file
    begin = time.perf_counter()

    t = _stage(f"1/6 synthesizer: SEAN on the labeled phantom slices ({cfg.synth.image_size} px)")
    # every stage shares one data folder and slice cache, so phantoms and lung masks are made once
    cfg = cfg.replace(data=dataclasses.replace(
        cfg.data, root=str((out / "data").resolve()), cache_dir=str((out / "cache").resolve())))
    synth_bundle = train_synthesizer(cfg, out / "synth")
    gallery = _gallery(cfg, synth_bundle, out)
    _done(t, f"bundle {synth_bundle}; gallery {gallery}")
    cfg = cfg.replace(synth=dataclasses.replace(cfg.synth, bundle=str(synth_bundle.resolve())))

    bundles: dict[str, Path] = {}
    t = _stage("2/6 baseline: labeled slices only")
    bundles["baseline"] = train(_with_method(cfg, "baseline"), out / "baseline").bundle
    _done(t, f"bundle {bundles['baseline']}")

    t = _stage("3/6 SA-CPS: cross pseudo supervision + synthetic images of the pseudo-labels")
    bundles["sa-cps"] = train(_with_method(cfg, "sa-cps"), out / "sa-cps").bundle
    _done(t, f"bundle {bundles['sa-cps']}")

    if sa_st:
        t = _stage("4/6 SA-ST: student of the SA-CPS teacher on real + pseudo + synthetic pairs")
        teacher = str(bundles["sa-cps"].resolve())
        bundles["sa-st"] = train(_with_method(cfg, "sa-st", teacher=teacher), out / "sa-st").bundle
        _done(t, f"bundle {bundles['sa-st']}")
    else:
        _stage("4/6 SA-ST: skipped (--no-sa-st)")

    t = _stage(f"5/6 plsynth-infer on {HOLDOUT_N} held-out phantom volumes")
    holdout = out / "holdout"
    write_phantom_dataset(holdout, n=HOLDOUT_N, seed=HOLDOUT_SEED, shape=cfg.data.phantom_shape)
    volumes = sorted(holdout.glob("*_ct.nii.gz"))
    for method, bundle in bundles.items():
        _infer(bundle, volumes, out / method / "infer")
    _done(t, "masks, overlays and reports written")

    t = _stage("6/6 scoring the masks against the phantoms' true infection")
    table = _score(bundles, volumes, out, cfg.train.tolerance_mm)
    text = _format(table, out, gallery, time.perf_counter() - begin)
    print(text, flush=True)
    (out / "summary.md").write_text(text + "\n")
    (out / "summary.json").write_text(json.dumps(table, indent=2))
    return table


def _gallery(cfg: Config, synth_bundle: Path, out: Path) -> Path:
    from plsynth.data.datasets import build_splits
    from plsynth.training.synth_preview import write_preview

    labeled = build_splits(cfg, out / "synth").labeled
    return write_preview(synth_bundle, labeled, out / "synth" / "gallery.png", n=6, seed=cfg.synth.seed)


def _infer(bundle: Path, volumes: list[Path], out: Path) -> None:
    """Run the hospital CLI exactly as a user would, as its own process."""
    cmd = [sys.executable, "-m", "plsynth.deploy.infer_cli", *map(str, volumes), "-o", str(out),
           "--model", str(bundle), "--engine", "ort", "--lung-backend", "classical", "--overlays"]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"plsynth-infer failed ({result.returncode}) for {bundle}:\n{result.stderr[-2000:]}")


def _score(bundles: dict[str, Path], volumes: list[Path], out: Path, tolerance_mm: float) -> dict:
    import nibabel as nib
    import numpy as np

    from plsynth.metrics import score_case

    table: dict[str, dict] = {}
    for method in bundles:
        rows = []
        for ct in volumes:
            name = ct.name.removesuffix(".nii.gz")
            truth_img = nib.load(ct.with_name(name.removesuffix("_ct") + "_seg.nii.gz"))
            pred = np.asarray(nib.load(out / method / "infer" / f"{name}.nii.gz").dataobj) > 0
            truth = np.asarray(truth_img.dataobj) > 0
            spacing = tuple(float(s) for s in truth_img.header.get_zooms()[:3])
            rows.append({"case": name, **score_case(pred, truth, spacing, tolerance_mm)})
        table[method] = {
            "cases": rows,
            "dice": float(np.mean([r["dice"] for r in rows])),
            "nsd": float(np.mean([r["nsd"] for r in rows])),
        }
    return table


def _format(table: dict, out: Path, gallery: Path, seconds: float) -> str:
    lines = [
        "",
        f"plsynth demo: held-out phantom volumes (n={len(next(iter(table.values()))['cases'])}), "
        "infection masks from plsynth-infer",
        "",
        "| method | DSC | NSD (1 mm) |",
        "|---|---|---|",
    ]
    lines += [f"| {m} | {row['dice']:.3f} | {row['nsd']:.3f} |" for m, row in table.items()]
    lines += [
        "",
        f"gallery (synthesizer):  {gallery}",
        *[f"{m + ':':23} bundle {out / m / 'bundle'}, masks + report.csv + overlays/ in {out / m / 'infer'}"
          for m in table],
        f"total time: {seconds / 60:.1f} min",
    ]
    return "\n".join(lines)
