"""Training-step speed at the CPU preset: channels-last, torch.compile and thread settings, A/B interleaved.

    python bench/train_step_bench.py --set data.root=/path/to/covid-semiseg [--methods baseline sa-cps]
        [--rounds 3] [--steps baseline=6 sa-cps=2] [--out runs/train_step_bench] [--synth-bundle DIR]

The real step of the training loop (`loop._setup` / `loop._step`: batch making, forward, loss,
backward, SGD) on the preset's prepared slices (``configs/semiseg-cpu.yaml``: 128 px, batch 8 + 8,
U-Net width 16), for each method and each variant:

  default        1 intra-op thread (``train.threads: 1``), contiguous (NCHW) tensors, eager
  threads-2      ``torch.set_num_threads(2)`` around its steps
  channels-last  networks and their inputs in ``torch.channels_last``
  compile        ``torch.compile`` (inductor) of each network; its first step, the compilation, is
                 reported apart (``compile_s``) and left out of the step times

Each variant has its own networks (same seed, same batches); the rounds interleave them
(round r: default, threads-2, channels-last, compile, each ``steps`` steps), so a load change on
this shared machine hits every variant alike, and the ratio to ``default`` is taken within each
round (median over rounds). Inter-op threads can only be set once per process, so
``--interop`` compares child processes alternately started with ``torch.set_num_interop_threads(1)``
and torch's default, each timing the default variant of the baseline.

SA-CPS needs a synthesizer bundle (``--synth-bundle``); without one an untrained bundle of the
preset's size is written into OUT (same architecture and cost as a trained one). Writes
``--results`` (default bench/results/train_step.md) and its .json, with the command, the machine,
the date and the load average before and after.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

import machine

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
from ray_bench import write_results  # noqa: E402
VARIANTS = ("default", "threads-2", "channels-last", "compile")


class ChannelsLast(torch.nn.Module):
    """A network whose weights and inputs are channels-last (NHWC in memory)."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net.to(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.contiguous(memory_format=torch.channels_last))


def make_run(cfg, out: Path, data, synth, variant: str):
    from plsynth.training.loop import TrainHooks, _setup

    run = _setup(cfg, out, TrainHooks(device="cpu"), data, synth, None)
    if variant == "channels-last":
        run.prepared = {k: ChannelsLast(v) for k, v in run.prepared.items()}
    elif variant == "compile":
        run.prepared = {k: torch.compile(v) for k, v in run.prepared.items()}
    return run


def time_steps(run, first: int, n: int, threads: int) -> list[tuple[float, float]]:
    """(wall s, CPU s) of steps ``first .. first + n - 1``, run with ``threads`` intra-op threads."""
    from plsynth.training.loop import _step

    torch.set_num_threads(threads)
    times = []
    for step in range(first, first + n):
        tic, cpu = time.perf_counter(), time.process_time()
        _step(run, step)
        times.append((time.perf_counter() - tic, time.process_time() - cpu))
    torch.set_num_threads(1)
    return times


def bench_method(cfg, method: str, out: Path, data, synth, rounds: int, steps: int,
                 variants: tuple[str, ...] = VARIANTS) -> dict:
    cfg = cfg.replace(train=dataclasses.replace(cfg.train, method=method, threads=1, max_iters=10**6, epochs=100))
    runs, compile_s, step = {}, None, 0
    for variant in variants:
        runs[variant] = make_run(cfg, out / f"{method}-{variant}", data, synth if method != "baseline" else None,
                                 variant)
    # one warm-up step each (allocator, ORT session); for compile this is the compilation
    for variant, run in runs.items():
        (wall, _), = time_steps(run, step, 1, 1)
        if variant == "compile":
            compile_s = wall
        logging.info("%s %s: warm-up step %.2f s", method, variant, wall)
    step += 1
    per_round: list[dict[str, list[tuple[float, float]]]] = []
    for r in range(rounds):
        times = {}
        for variant, run in runs.items():
            times[variant] = time_steps(run, step, steps, 2 if variant == "threads-2" else 1)
        step += steps
        per_round.append(times)
        logging.info("%s round %d: %s", method, r + 1, ", ".join(
            f"{v} {statistics.median(w for w, _ in t):.3f} s" for v, t in times.items()))
    for run in runs.values():
        run.close()
    result = {"compile_s": compile_s, "steps_per_round": steps, "rounds": rounds, "variants": {}}
    for variant in variants:
        walls = [w for times in per_round for w, _ in times[variant]]
        cpus = [c for times in per_round for _, c in times[variant]]
        ratios = [statistics.median(w for w, _ in times[variant]) / statistics.median(w for w, _ in times["default"])
                  for times in per_round]
        result["variants"][variant] = {"wall_s_median": statistics.median(walls), "cpu_s_median": statistics.median(cpus),
                                       "wall_ratio_to_default": statistics.median(ratios), "ratios_by_round": ratios}
    result["compile_break_even_steps"] = _break_even(result) if compile_s is not None else None
    return result


def _break_even(result: dict) -> float | None:
    """Steps after which compiling has paid for its compilation (None when a compiled step is not faster)."""
    saved = result["variants"]["default"]["wall_s_median"] - result["variants"]["compile"]["wall_s_median"]
    return round(result["compile_s"] / saved) if saved > 0 else None


def child(cfg, interop: int, steps: int) -> None:
    """--child: time ``steps`` baseline steps with ``interop`` inter-op threads (0: torch's default)."""
    if interop:
        torch.set_num_interop_threads(interop)
    from plsynth.data.datasets import build_splits

    import tempfile

    out = Path(tempfile.mkdtemp(prefix="interop-"))
    cfg = cfg.replace(train=dataclasses.replace(cfg.train, method="baseline", threads=1, max_iters=10**6, epochs=100))
    run = make_run(cfg, out, build_splits(cfg, out), None, "default")
    time_steps(run, 0, 1, 1)  # warm-up
    walls = [w for w, _ in time_steps(run, 1, steps, 1)]
    run.close()
    print(json.dumps({"interop": torch.get_num_interop_threads(), "wall_s_median": statistics.median(walls)}))


def bench_interop(argv: list[str], rounds: int, steps: int) -> dict:
    results: dict[str, list[float]] = {"1": [], "default": []}
    for _ in range(rounds):
        for interop in (1, 0):
            proc = subprocess.run([sys.executable, __file__, *argv, "--child", str(interop), "--child-steps", str(steps)],
                                  capture_output=True, text=True, check=True)
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            results["1" if interop else "default"].append(row["wall_s_median"])
            if not interop:
                default_threads = row["interop"]
    ratios = [a / b for a, b in zip(results["1"], results["default"])]
    return {"default_interop_threads": default_threads, "wall_s_by_round": results,
            "wall_ratio_interop1_to_default": statistics.median(ratios)}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "semiseg-cpu.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="dotted override, repeatable")
    parser.add_argument("--methods", nargs="+", default=["baseline", "sa-cps"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", nargs="+", default=["baseline=6", "sa-cps=2"], help="METHOD=steps per round")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS),
                        help="default is always measured (the ratios' reference)")
    parser.add_argument("--interop", action="store_true", help="also compare inter-op threads 1 vs default")
    parser.add_argument("--synth-bundle", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "train_step_bench")
    parser.add_argument("--results", type=Path, default=REPO / "bench" / "results" / "train_step.md")
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child-steps", type=int, default=6, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from plsynth.config import load_config

    cfg = load_config(args.config, args.overrides)
    if args.child is not None:
        child(cfg, args.child, args.child_steps)
        return 0
    torch.set_num_threads(1)
    load_before, started = os.getloadavg(), datetime.datetime.now(datetime.timezone.utc)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    from plsynth.data.datasets import build_splits

    data = build_splits(cfg, out)
    synth = None
    if any(m != "baseline" for m in args.methods):
        from plsynth.training.methods import make_synthesis_client
        from ray_bench import untrained_bundle

        bundle = args.synth_bundle or untrained_bundle(cfg, out / "synth-untrained")
        cfg = cfg.replace(synth=dataclasses.replace(cfg.synth, bundle=str(bundle)))
        synth = make_synthesis_client(cfg)
    steps = dict(s.split("=") for s in args.steps)
    variants = ("default", *[v for v in args.variants if v != "default"])
    results = {m: bench_method(cfg, m, out, data, synth, args.rounds, int(steps.get(m, 2)), variants)
               for m in args.methods}
    if args.interop:
        child_argv = [a for a in argv if a != "--interop"]
        results["interop"] = bench_interop(child_argv, args.rounds, int(steps.get("baseline", 6)))
    load_after = os.getloadavg()
    record = {
        "command": "python bench/train_step_bench.py " + " ".join(argv),
        "date_utc": started.strftime("%Y-%m-%d %H:%M"),
        "machine": f"{machine.describe()}, {platform.platform()}",
        "torch": torch.__version__,
        "load_average_before": load_before, "load_average_after": load_after,
        "config": str(args.config), "image_size": cfg.data.image_size,
        "batch": [cfg.train.batch_labeled, cfg.train.batch_unlabeled], "width": cfg.model.width,
        "results": results,
    }
    lines = [
        "# Training step at the CPU preset: channels-last, torch.compile, threads (A/B interleaved)",
        "",
        f"`{record['command']}`",
        "",
        f"{record['date_utc']} UTC; {record['machine']}; torch {record['torch']}; load average (1, 5, 15 min) "
        f"{', '.join(f'{x:.2f}' for x in load_before)} before, {', '.join(f'{x:.2f}' for x in load_after)} after "
        "(a shared machine: compare the ratios, measured side by side, not the seconds). "
        f"{cfg.data.image_size} px, batch {cfg.train.batch_labeled} + {cfg.train.batch_unlabeled}, "
        f"U-Net width {cfg.model.width}.",
        "",
        "| method | variant | wall s / step (median) | CPU s / step | wall ratio to default (median of rounds) |",
        "|---|---|---|---|---|",
    ]
    for method in args.methods:
        for variant, v in results[method]["variants"].items():
            lines.append(f"| {method} | {variant} | {v['wall_s_median']:.3f} | {v['cpu_s_median']:.3f} "
                         f"| {v['wall_ratio_to_default']:.2f} |")
    lines.append("")
    for method in args.methods:
        r = results[method]
        compiled = "" if r["compile_s"] is None else (
            f"compilation (first compiled step) {r['compile_s']:.1f} s, "
            + (f"pays back after ~{r['compile_break_even_steps']} steps; " if r["compile_break_even_steps"] is not None
               else "a compiled step is not faster; "))
        lines.append(f"- {method}: {compiled}{r['rounds']} rounds x {r['steps_per_round']} steps per variant.")
    if "interop" in results:
        i = results["interop"]
        lines.append(f"- inter-op threads 1 vs torch's default ({i['default_interop_threads']}), baseline, separate "
                     f"processes alternating: wall ratio {i['wall_ratio_interop1_to_default']:.2f}.")
    return write_results(args.results.stem, lines, record, args.results.parent)


if __name__ == "__main__":
    sys.exit(main())
