"""Accuracy benchmark: each method x seeds on one preset with the same iteration budget.

    python bench/accuracy.py --out runs/bench-accuracy                     # semiseg-cpu, baseline/cps/sa-cps, seeds 0 1 2
    python bench/accuracy.py --out /tmp/b --config configs/phantom-smoke.yaml --seeds 0 1
    python bench/accuracy.py --out runs/bench-accuracy --methods st sa-st sa-st-cps --seeds 0
    python bench/accuracy.py --out runs/bench-gpu --preset gpu     # semiseg-gpu: CUDA, AMP, 256 px, 4000 iterations
    python bench/accuracy.py --out runs/bench-gpu --preset gpu --dry-run   # the plan as JSON, nothing trained

Rows (``ROWS``): the five methods, ``sa-st-cps`` (the paper's "SA-ST (+SA-CPS)") and the switches of
the paper's Tables II and III, ``sa-cps-synth`` (SA-CPS without the pseudo-label term) and
``sa-st-synth`` (SA-ST without the pseudo-labelled real slices). Self-training rows take their
teacher from the same seed's run in OUT: ``st``, ``sa-st`` and ``sa-st-synth`` from
``baseline-s<seed>``, ``sa-st-cps`` from ``sa-cps-s<seed>``; the teacher run must exist (list it
first, or run it in an earlier call with the same --out). The table gives, per seed, each row's
Dice minus that of the row it claims to beat (``CLAIMS``: CPS > baseline, SA-CPS > CPS, ...).

Every run uses ``train.bundle_from=last`` and reports the validation Dice / NSD of its *final*
checkpoint (the last row of val.csv, at the fixed iteration count), so no run is picked by its
validation score (no selection bias); ``train.bundle_from=last`` is applied after ``--set``, so
it cannot be overridden. With ``train.val_every_iters`` the runs leave a curve (val.csv,
curves.png), and the table says which runs plateaued: validation Dice over the last quarter of
the budget within ``PLATEAU_TOLERANCE`` of the final value. Runs go to ``OUT/<method>-s<seed>/`` (each with its
bundle) and ``OUT/<method>/bundle`` links to the first seed's bundle. The SA-CPS synthesizer is
the config's ``synth.bundle`` when it exists, else it is trained once into ``OUT/synthesizer``
on the same split's labeled slices. All runs share one preprocessed slice cache
(``OUT/cache``). A finished run is not retrained (its last.pt is at the final step), so a
killed benchmark picks up where it stopped. Each finished row is written at once to the record
(``--record``, default ``OUT/accuracy.json``) with a digest of its config (machine paths left
out); a row recorded with the same digest whose run folder is gone is not retrained, so a table
kept in the repository (``--record bench/results/accuracy-cpu.json``) grows over sessions whose
run folders do not survive. The table (mean +- sd over seeds, every seed, paired differences)
goes to ``--results`` (default bench/results/accuracy.md).

    python bench/accuracy.py --out runs/bench-accuracy --tune [--address ray://...] [--trial-cpus 2]

``--tune`` runs the same runs as Ray Tune trials, each declaring its resources (``--trial-cpus``,
default ``train.threads`` or 1; a GPU each when the runs train on CUDA, see
``ray_train.use_gpus``), side by side where the cluster has room and one after another where
it has not. Rows without a teacher form the first Tuner, the self-training rows (whose teachers
those are) the second. Trials train into the same ``OUT/<method>-s<seed>`` folders, so a killed
sweep resumes: finished runs are not retrained, a half-done one continues from its last.pt,
and the Tune experiment (``OUT/tune``) is restored. Same table at the end. Ray is joined as
by the entry points (``--address``, RAY_ADDRESS, a local ``ray start``, else an embedded Ray).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import logging
import os
import statistics
import sys
import time
from pathlib import Path

import machine

REPO = Path(__file__).resolve().parents[1]
PRESETS = {"cpu": REPO / "configs" / "semiseg-cpu.yaml", "gpu": REPO / "configs" / "semiseg-gpu.yaml"}


PLATEAU_TOLERANCE = 0.02  # val Dice: the last quarter of a curve within this of its final value counts as a plateau


def plateaued(curve: list[tuple[int, float]], tolerance: float = PLATEAU_TOLERANCE) -> bool | None:
    """Whether every validation Dice of the last quarter of the run (``(step, dice)`` pairs, steps
    >= 3/4 of the final step) lies within ``tolerance`` of the final one; None with fewer than
    two points there (validate more often: ``train.val_every_iters``)."""
    final_step, final = curve[-1]
    tail = [dice for step, dice in curve if step >= 0.75 * final_step]
    if len(tail) < 2:
        return None
    return max(abs(dice - final) for dice in tail) <= tolerance


def _final_val(run: Path) -> dict:
    """The final checkpoint's scores (the last row of val.csv: no selection) and the curve."""
    with open(run / "val.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows:
        raise RuntimeError(f"{run}/val.csv has no validation rows; the benchmark needs a validation split")
    last = rows[-1]
    curve = [(int(r["step"]), float(r["dice"])) for r in rows]
    return {"step": int(last["step"]), "dice": float(last["dice"]), "nsd": float(last["nsd"]), "cases": int(last["cases"]),
            "curve": curve, "plateaued": plateaued(curve)}


def _seconds_per_iteration(run: Path) -> float:
    from plsynth.training.run_log import read_rows

    times = [float(r["seconds"]) for r in read_rows(run / "log.csv")]
    return statistics.median(times) if times else float("nan")


LOSS_WINDOW = 100  # iterations: where a loss term "ends" is its mean over the run's last 100 steps


def final_terms(run: Path, window: int = LOSS_WINDOW) -> dict[str, float]:
    """Each loss term's mean over the last ``window`` rows of log.csv (RunLog drops a resumed run's
    repeated steps): whether SA-CPS's synthetic term ends at or below its pseudo-label term."""
    from plsynth.training.run_log import read_rows

    last = read_rows(run / "log.csv")[-window:]
    return {k: statistics.mean(float(r[k]) for r in last) for k in ("loss_s", "loss_pseudo", "loss_synthetic")
            if last and all(r.get(k) for r in last)}


# benchmark row -> (method trained, teacher row, Table II / III switches); the paper's names
ROWS = {
    "baseline": ("baseline", "", {}),
    "cps": ("cps", "", {}),
    "sa-cps": ("sa-cps", "", {}),
    "sa-cps-synth": ("sa-cps", "", {"use_pseudo": False}),  # Table II: L_s + L_synthetic
    "st": ("st", "baseline", {}),
    "sa-st": ("sa-st", "baseline", {}),
    "sa-st-synth": ("sa-st", "baseline", {"use_pseudo": False}),  # Table III: real + synthetic
    "sa-st-cps": ("sa-st", "sa-cps", {}),  # the paper's "SA-ST (+SA-CPS)"
}
# row -> the row it claims to beat: the table gives the per-seed paired difference
CLAIMS = {"cps": "baseline", "sa-cps": "cps", "sa-cps-synth": "baseline", "st": "baseline", "sa-st": "st",
          "sa-st-synth": "baseline", "sa-st-cps": "sa-st"}
# keys that name places on one machine, not the experiment: left out of a row's digest
MACHINE_KEYS = {("data", "root"), ("data", "unlabeled_root"), ("data", "cache_dir"), ("synth", "bundle"),
                ("synth", "segmenter"), ("train", "teacher")}


def row_config(base: dict, row: dict):
    """The config one table row trains with: the base config, the row's method, seed, teacher and switches."""
    from plsynth.config import config_from_dict

    cfg = config_from_dict(base, where=base.get("source") or "<accuracy>")
    return cfg.replace(train=dataclasses.replace(cfg.train, method=row["trained"], seed=row["seed"],
                                                teacher=row["teacher"], **row["switches"]))


def config_digest(cfg) -> str:
    """sha256 of the resolved config without machine paths, plus the slice cache's key (which
    changes when preprocessing does, lung masks included): a recorded row is reused only for the
    same experiment on the same data."""
    from plsynth.data.slice_cache import config_key
    from plsynth.hashing import json_digest

    raw = cfg.to_dict()
    raw.pop("source", None)
    for section, key in MACHINE_KEYS:
        raw[section].pop(key, None)
    raw["slice_cache"] = config_key(cfg.data)
    return json_digest(raw)


def _mean_sd(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} +- {statistics.stdev(values):.4f}"


def train_row(base: dict, row: dict) -> dict:
    """Train one table row (``row``: method, seed, trained, teacher, run) and return its final scores.

    A run folder that was already finished is only recorded: it keeps the time its last checkpoint
    was written, and wall time and load are None, since this call timed no training."""
    from plsynth.training.loop import train

    cfg = row_config(base, row)
    run = Path(row["run"])
    tic = time.perf_counter()
    load = os.getloadavg()
    result = train(cfg, run)
    timed = result.start < result.steps
    finished = time.gmtime() if timed else time.gmtime((run / "last.pt").stat().st_mtime)
    return {"seed": row["seed"], **_final_val(run), "final_terms": final_terms(run),
            "seconds_per_iteration": _seconds_per_iteration(run),
            "wall_seconds": round(time.perf_counter() - tic, 1) if timed else None, "run": str(run),
            "digest": config_digest(cfg), "finished": time.strftime("%Y-%m-%d %H:%M UTC", finished),
            "load_average": [round(x, 1) for x in (*load, *os.getloadavg())] if timed else None,
            "machine": machine.describe()}


def _trial(config: dict, base: dict) -> None:
    """One Ray Tune trial: a table row, reported as the trial's metrics."""
    from ray import tune

    tune.report(train_row(base, config["row"]))


def tune_rows(base, rows: list[dict], out: Path, name: str, cpus: float) -> list[dict]:
    """Run ``rows`` as Ray Tune trials (grid over the rows), restoring ``OUT/tune/<name>`` if it exists."""
    from ray import tune

    from plsynth.training.ray_train import use_gpus

    resources = {"cpu": cpus, "gpu": 1 if use_gpus(base) else 0}
    trainable = tune.with_resources(tune.with_parameters(_trial, base=base.to_dict()), resources)
    path = out / "tune" / name
    if tune.Tuner.can_restore(path):
        logging.info("restoring the Tune experiment %s", path)
        tuner = tune.Tuner.restore(str(path), trainable=trainable, resume_errored=True)
    else:
        tuner = tune.Tuner(trainable, param_space={"row": tune.grid_search(rows)},
                           run_config=tune.RunConfig(name=name, storage_path=str(out / "tune"), verbose=1))
    grid = tuner.fit()
    if grid.errors:
        raise RuntimeError(f"{len(grid.errors)} Tune trial(s) of {name} failed; first: {grid.errors[0]}")
    by_run = {r.metrics["run"]: {k: r.metrics[k] for k in ("seed", "step", "dice", "nsd", "cases", "curve", "plateaued",
                                                            "final_terms", "seconds_per_iteration", "wall_seconds", "run", "digest", "finished",
                                                            "load_average", "machine")}
              for r in grid}
    return [by_run[row["run"]] for row in rows]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu",
                        help="cpu: configs/semiseg-cpu.yaml; gpu: configs/semiseg-gpu.yaml (CUDA, AMP, 256 px)")
    parser.add_argument("--config", type=Path, default=None, help="a config instead of the preset's")
    parser.add_argument("--methods", nargs="+", default=["baseline", "cps", "sa-cps"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="dotted override, repeatable")
    parser.add_argument("--results", type=Path, default=None, help="default bench/results/accuracy.md "
                        "(--preset gpu: accuracy-gpu.md)")
    parser.add_argument("--tune", action="store_true", help="run the runs as Ray Tune trials (see the docstring)")
    parser.add_argument("--address", default="", help="with --tune: the Ray cluster to join")
    parser.add_argument("--trial-cpus", type=float, default=0.0, help="with --tune: CPUs per trial "
                        "(default train.threads or 1)")
    parser.add_argument("--record", type=Path, default=None, help="JSON of every finished row (default "
                        "OUT/accuracy.json); a row found there with the same config is not retrained when its run "
                        "folder is gone, so a table can be built over sessions")
    parser.add_argument("--dry-run", action="store_true", help="print the plan (config, device, rows) as JSON "
                        "and exit without training")
    args = parser.parse_args(argv)
    args.config = args.config or PRESETS[args.preset]
    args.results = args.results or REPO / "bench" / "results" / ("accuracy.md" if args.preset == "cpu" else
                                                                   f"accuracy-{args.preset}.md")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from plsynth.atomic import atomic_write_text
    from plsynth.config import load_config

    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    # bundle_from=last after the user's overrides: the bundle is the scored final checkpoint, never best.pt
    overrides = [f"data.cache_dir={out / 'cache'}", *args.overrides, "train.bundle_from=last"]
    base = load_config(args.config, overrides)
    command = (f"python bench/accuracy.py --out {args.out} --config {args.config} --methods {' '.join(args.methods)} "
               f"--seeds {' '.join(map(str, args.seeds))}" + "".join(f" --set {o}" for o in args.overrides)
               + (f" --record {args.record}" if args.record else "") + (" --tune" if args.tune else ""))
    # every finished row goes to the record at once; OUT/accuracy.json, or a file kept in the repository
    # (--record), so that a table built over several sessions survives a lost run folder
    record = args.record or out / "accuracy.json"
    saved = json.loads(record.read_text()) if record.is_file() else {"results": {}, "commands": []}
    results: dict[str, list[dict]] = saved["results"]
    saved["commands"] = [c for c in saved["commands"] if c != command] + [command]
    unknown = [m for m in args.methods if m not in ROWS]
    if unknown:
        parser.error(f"unknown row(s) {unknown}; rows: {', '.join(ROWS)}")
    def row_for(method: str, seed: int) -> dict:
        trained, teacher_row, switches = ROWS[method]
        teacher = str(out / f"{teacher_row}-s{seed}" / "bundle") if teacher_row else ""
        return {"method": method, "seed": seed, "trained": trained, "teacher": teacher,
                "teacher_row": teacher_row, "switches": switches, "run": str(out / f"{method}-s{seed}")}

    rows = [row_for(method, seed) for method in args.methods for seed in args.seeds]
    base_dict = base.to_dict()

    def recorded(row: dict) -> dict | None:
        """The record's result for this row when it was trained with the same config and its run is not here."""
        if (Path(row["run"]) / "val.csv").is_file():
            return None  # the run folder decides (a finished run is not retrained, a killed one resumes)
        digest = config_digest(row_config(base_dict, row))
        return next((r for r in results.get(row["method"], []) if r["seed"] == row["seed"] and r.get("digest") == digest),
                    None)

    prior = {(r["method"], r["seed"]): recorded(r) for r in rows}  # each row's record, looked up once
    listed = set(prior)
    for row in rows:  # a teacher must exist already or be trained by this call
        if not row["teacher_row"] or prior[row["method"], row["seed"]] or (Path(row["teacher"]) / "meta.json").is_file():
            continue
        if (row["teacher_row"], row["seed"]) not in listed:
            parser.error(f"{row['method']} needs its teacher {row['teacher']}: run {row['teacher_row']} with seed "
                         f"{row['seed']} first")
    todo = [r for r in rows if not prior[r["method"], r["seed"]]]
    # a recorded teacher whose run folder is gone is trained again for the students that still need it
    needed = {(r["teacher_row"], r["seed"]) for r in todo
              if r["teacher_row"] and not (Path(r["teacher"]) / "meta.json").is_file()}
    todo = [r for r in rows if r in todo or (r["method"], r["seed"]) in needed]
    synth_bundle = Path(base.synth.bundle) if base.synth.bundle else None
    uses_synth = any(r["trained"].startswith("sa-") for r in todo)
    train_synth = uses_synth and not (synth_bundle and (synth_bundle / "meta.json").is_file())
    # a synthesizer trained here with a label-consistency term (synth.lambda_seg) takes the first seed's
    # baseline as its frozen segmenter when the configured one does not exist; that baseline is trained first
    segmenter_row = None
    if train_synth and base.synth.lambda_seg and not (Path(base.synth.segmenter) / "meta.json").is_file():
        segmenter_row = next((r for r in todo if r["method"] == "baseline" and r["seed"] == args.seeds[0]),
                             None) or row_for("baseline", args.seeds[0])
        base = base.replace(synth=dataclasses.replace(base.synth, segmenter=str(Path(segmenter_row["run"]) / "bundle")))
    if args.dry_run:
        t = base.train
        print(json.dumps({
            "config": str(args.config), "command": command, "device": t.device, "amp": t.amp,
            "image_size": base.data.image_size, "model_width": base.model.width,
            "batch": [t.batch_labeled, t.batch_unlabeled], "epochs": t.epochs, "max_iters": t.max_iters,
            "val_every_iters": t.val_every_iters, "bundle_from": t.bundle_from, "cache_dir": base.data.cache_dir,
            "synthesizer": str(out / "synthesizer") if train_synth else (str(synth_bundle) if synth_bundle else None),
            "train_synthesizer": train_synth, "rows": rows, "train": [r["run"] for r in todo],
            "synth_segmenter": base.synth.segmenter if train_synth and base.synth.lambda_seg else None,
            "results": str(args.results),
        }, indent=2))
        return 0

    def keep(row: dict, result: dict) -> None:
        """Write this row into the record as it is on disk now: another call (e.g. on the other core) may
        have recorded rows since this one started."""
        if record.is_file():
            disk = json.loads(record.read_text())
            results.clear()
            results.update(disk["results"])
            saved["commands"] = [c for c in disk["commands"] if c != command] + [command]
        kept = [r for r in results.get(row["method"], []) if r["seed"] != row["seed"]]
        result = dict(result, run=Path(result["run"]).name)  # OUT/<run>: no machine path in a kept record
        results[row["method"]] = sorted([*kept, result], key=lambda r: r["seed"])
        record.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(record, json.dumps(saved, indent=2) + "\n")

    if uses_synth:
        if train_synth:
            from plsynth.training.synthesizer import train_synthesizer

            synth_out = out / "synthesizer"
            if not (synth_out / "bundle" / "meta.json").is_file():
                if segmenter_row is not None and not (Path(base.synth.segmenter) / "meta.json").is_file():
                    logging.info("training %s first: the synthesizer's frozen segmenter", segmenter_row["run"])
                    keep(segmenter_row, train_row(base_dict, segmenter_row))
                    todo = [r for r in todo if r is not segmenter_row]  # trained: not again in the loop below
                logging.info("training the synthesizer once for all SA-CPS runs: %s", synth_out)
                train_synthesizer(base, synth_out)
            synth_bundle = synth_out / "bundle"
        base = base.replace(synth=dataclasses.replace(base.synth, bundle=str(synth_bundle)))
        base_dict = base.to_dict()

    here = machine.describe()
    for row in rows:
        if row not in todo:
            ran_on = prior[row["method"], row["seed"]].get("machine", "an unrecorded machine")
            logging.info("%s seed %d: recorded in %s, not retrained%s", row["method"], row["seed"], record,
                         "" if ran_on == here else f" (it ran on {ran_on}, not this machine: training is not "
                         "bit-reproducible across CPUs)")
    if args.tune:
        from plsynth.training.ray_entry import connect_ray

        connect_ray(args.address)
        cpus = args.trial_cpus or float(base.train.threads or 1)
        for stage, name in (([r for r in todo if not r["teacher_row"]], "rows"),
                            ([r for r in todo if r["teacher_row"]], "self-training-rows")):
            if stage:
                for row, result in zip(stage, tune_rows(base, stage, out, name, cpus)):
                    keep(row, result)
    else:
        for row in todo:
            result = train_row(base_dict, row)
            keep(row, result)
            logging.info("%s seed %d: final val dice %.4f nsd %.4f", row["method"], row["seed"], result["dice"],
                         result["nsd"])
    for method in args.methods:
        link = out / method / "bundle"
        if (out / f"{method}-s{args.seeds[0]}" / "bundle").is_dir():
            link.parent.mkdir(exist_ok=True)
            if link.is_symlink() or link.exists():
                link.unlink()
            link.symlink_to(Path("..") / f"{method}-s{args.seeds[0]}" / "bundle", target_is_directory=True)
    lines = table(results, [m for m in ROWS if m in results], base, args.config, saved["commands"])
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


def paired(results: dict[str, list[dict]], method: str, other: str) -> list[tuple[int, float]]:
    """Per-seed Dice differences method - other over the seeds both rows have."""
    theirs = {r["seed"]: r["dice"] for r in results.get(other, [])}
    return [(r["seed"], r["dice"] - theirs[r["seed"]]) for r in results.get(method, []) if r["seed"] in theirs]


def table(results: dict[str, list[dict]], methods: list[str], base, config: Path, commands: list[str]) -> list[str]:
    """The Markdown table: mean +- sd per row, every seed, and each row's paired difference to the row it claims to beat."""
    steps = sorted({r["step"] for m in methods for r in results[m]})
    cases = results[methods[0]][0]["cases"]
    lines = [
        f"# Accuracy: {base.name} ({config.name})",
        "",
        f"Final checkpoint at a fixed budget of {steps} iterations (batch {base.train.batch_labeled} labeled "
        f"+ {base.train.batch_unlabeled} unlabeled, {base.data.image_size} px, U-Net width {base.model.width}); "
        f"validation: {cases} held-out cases; NSD tolerance "
        f"{base.train.tolerance_mm} {'mm' if base.data.layout not in ('semiseg',) else 'pixel'} "
        "(slices without spacing use pixels).",
        "",
        f"Plateaued: runs whose validation Dice over the last quarter of the budget stayed within "
        f"{PLATEAU_TOLERANCE} of the final value (validation every {base.train.val_every_iters or 'epoch'} "
        "iterations; `?`: fewer than two validations there).",
        "",
        "| row | seeds | val DSC (mean +- sd) | val NSD (mean +- sd) | DSC per seed | plateaued | s / iteration (median) |",
        "|---|---|---|---|---|---|---|",
    ]
    for method in methods:
        rows = results[method]
        flags = [r.get("plateaued") for r in rows]
        plateau = "?" if None in flags else f"{sum(flags)}/{len(flags)}"
        per_seed = ", ".join(f"s{r['seed']} {r['dice']:.3f}" for r in rows)
        lines.append(
            f"| {method} | {len(rows)} | {_mean_sd([r['dice'] for r in rows])} | {_mean_sd([r['nsd'] for r in rows])} "
            f"| {per_seed} | {plateau} | {statistics.median(r['seconds_per_iteration'] for r in rows):.3f} |"
        )
    claims = [(m, CLAIMS[m]) for m in methods if CLAIMS.get(m) in methods and paired(results, m, CLAIMS[m])]
    if claims:
        lines += ["", "Paired differences (same seed, same split; the row minus the row it claims to beat):", "",
                  "| claim | per seed | mean | positive |", "|---|---|---|---|"]
        for method, other in claims:
            diffs = paired(results, method, other)
            lines.append(f"| {method} > {other} | {', '.join(f's{s} {d:+.3f}' for s, d in diffs)} "
                         f"| {statistics.mean(d for _, d in diffs):+.4f} | {sum(d > 0 for _, d in diffs)}/{len(diffs)} |")
    ended = [(m, r) for m in methods for r in results[m] if ROWS[m][2].get("use_pseudo", True)  # the pseudo term trains
             and {"loss_pseudo", "loss_synthetic"} <= set(r.get("final_terms", {}))]
    if ended:
        lines += ["", f"Where the loss terms end (mean of the last {LOSS_WINDOW} iterations of log.csv; the synthetic "
                  "pairs are as easy to fit as the pseudo-labelled real slices when the synthetic term ends at or below "
                  "the pseudo-label term):", "",
                  "| row | seed | pseudo-label term | synthetic term | synthetic <= pseudo |", "|---|---|---|---|---|"]
        for method, r in ended:
            pseudo, synthetic = r["final_terms"]["loss_pseudo"], r["final_terms"]["loss_synthetic"]
            lines.append(f"| {method} | {r['seed']} | {pseudo:.3f} | {synthetic:.3f} | {'yes' if synthetic <= pseudo else 'no'} |")
    machines: dict[str, list[str]] = {}
    for m in methods:
        for r in results[m]:
            machines.setdefault(r.get("machine", "not recorded"), []).append(f"{m} s{r['seed']}")
    if len(machines) > 1:  # a table built over sessions: training differs across CPUs, so say which row ran where
        lines += ["", "Machines (rows of one table trained on different machines; training is not bit-reproducible "
                  "across CPUs, so a paired difference across machines carries that noise too):", ""]
        lines += [f"- {name}: {', '.join(runs)}" for name, runs in machines.items()]
    elif machines:
        lines += ["", f"Machine: {next(iter(machines))}."]
    if any(ROWS[m][1] for m in methods):
        lines += ["", "Teachers: `st`, `sa-st` and `sa-st-synth` learn from the same seed's `baseline` run, `sa-st-cps` "
                  "(the paper's SA-ST (+SA-CPS)) from its `sa-cps` run; the student has the same iteration budget."]
    if any(ROWS[m][2] for m in methods):
        lines += ["", "Switches: `sa-cps-synth` is SA-CPS without the pseudo-label term (Table II: L_s + L_synthetic), "
                  "`sa-st-synth` SA-ST without the pseudo-labelled real slices (Table III: real + synthetic)."]
    lines += ["", "Commands (in this order):", ""] + [f"    {c}" for c in commands] + [""]
    return lines


if __name__ == "__main__":
    sys.exit(main())
