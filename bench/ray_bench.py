"""SA-CPS iteration time with synthesis through the Ray actor vs the decoder in-process vs CPS.

    .venv/bin/python bench/ray_bench.py [--config configs/semiseg-cpu.yaml] [--iters 8] [--out runs/ray_bench]

One run, side by side, at the CPU preset's sizes (network, synthesizer, batch 8 + 8, 128 px):
  cps              : one CPS iteration (no synthesis)
  sa-cps in-process: SA-CPS with LocalSynthesizer (ONNX Runtime) in the trainer process
  sa-cps actor     : SA-CPS with the named Ray synthesis actor (ONNX Runtime) via ActorSynthesisClient
plus the actor's round-trip overhead on one request of the SA-CPS batch, and the share of an
SA-CPS iteration spent in synthesis.

    .venv/bin/python bench/ray_bench.py --workers 1 2 [--method cps] [--iters 10]

Data-parallel scaling instead: the same run (global batch 8 + 8) under Ray Train with 1, then 2
workers of 1 thread and 1 CPU each; per worker the slices it trained on and its seconds in
optimizer steps (``ray_work.jsonl``), so samples/s per worker and in total. Writes
bench/results/ray_scaling.md and .json. The data are phantoms at the preset's image size (timing
does not depend on image content; the preset's real slices need a 1600-slice cache build), and
the synthesizer bundle is untrained (same architecture and cost as a trained one).
Writes bench/results/ray_bench.md and .json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from plsynth.training.loop import TrainHooks

REPO = Path(__file__).resolve().parents[1]


class TimedClient:
    """A SynthesisClient that records the seconds spent inside synthesize()."""

    def __init__(self, inner) -> None:
        self.inner, self.backend, self.bundle_sha256 = inner, inner.backend, inner.bundle_sha256
        self.seconds: list[float] = []

    def synthesize(self, infection, lung, images=None, seed=None):
        t0 = time.perf_counter()
        out = self.inner.synthesize(infection, lung, images=images, seed=seed)
        self.seconds.append(time.perf_counter() - t0)
        return out


class StepTimer(TrainHooks):
    """TrainHooks that time each optimizer step (the interval between after_step calls)."""

    def __init__(self) -> None:
        super().__init__(device="cpu")
        self.times: list[float] = []
        self._last = time.perf_counter()

    def after_step(self, step, terms):
        now = time.perf_counter()
        self.times.append(now - self._last)
        self._last = now


def untrained_bundle(cfg, path: Path) -> Path:
    from plsynth.models.sean import build_synthesizer
    from plsynth.bundles.synthesizer import write_decoder_bundle
    from plsynth.bundles.style_pool import StylePool

    if (path / "meta.json").is_file():
        return path
    from plsynth.errors import BundleError

    rng = np.random.default_rng(0)
    pool = StylePool(codes=rng.uniform(-1, 1, (16, 4, cfg.synth.style_dim)).astype(np.float32),
                     present=np.ones((16, 4), bool), has_infection=np.ones(16, bool))
    for seed in range(5):  # some random initialisations miss the writer's 1e-4 ONNX parity check
        torch.manual_seed(seed)
        decoder, encoder = build_synthesizer(cfg.synth)
        try:
            return write_decoder_bundle(path, decoder, encoder, pool, cfg)
        except BundleError as exc:
            logging.warning("untrained bundle, seed %d: %s", seed, exc)
    raise RuntimeError("no untrained initialisation passed the ONNX parity check")


def run(cfg, out: Path, data, synth, iters: int) -> dict:
    from plsynth.training.loop import train

    hooks = StepTimer()
    cfg = cfg.replace(train=dataclasses.replace(cfg.train, max_iters=iters, epochs=1, checkpoint_every=0))
    hooks._last = time.perf_counter()
    train(cfg, out, hooks, data=data, synth=synth, write_bundle=False)
    steady = hooks.times[1:]  # the first step warms up allocators and ORT
    result = {"iter_s_median": statistics.median(steady), "iter_s_all": hooks.times}
    if synth is not None:
        calls = synth.seconds[1:] if len(synth.seconds) > 1 else synth.seconds
        result["synth_s_median"] = statistics.median(calls)
        result["synth_share"] = result["synth_s_median"] / result["iter_s_median"]
    return result


def round_trip(client, local, batch: int, size: int, repeats: int = 7) -> dict:
    from plsynth.data.semantic import semantic_map  # noqa: F401 (same inputs as training)

    lung = torch.zeros(batch, size, size, dtype=torch.long)
    lung[:, size // 4: 3 * size // 4, size // 2 + 4: size - 8] = 1
    lung[:, size // 4: 3 * size // 4, 8: size // 2 - 4] = 2
    infection = torch.zeros(batch, 1, size, size)
    infection[:, :, size // 3: size // 2, size // 2 + 8: size - 16] = 1
    timings = {"local": [], "actor": []}
    for name, c in (("local", local), ("actor", client)):
        c.synthesize(infection, lung, seed=0)  # warm-up
        for r in range(repeats):
            t0 = time.perf_counter()
            c.synthesize(infection, lung, seed=r)
            timings[name].append(time.perf_counter() - t0)
    local_s, actor_s = statistics.median(timings["local"]), statistics.median(timings["actor"])
    return {"batch": batch, "local_s": local_s, "actor_s": actor_s, "overhead_s": actor_s - local_s,
            "actor_throughput_vs_local": local_s / actor_s}


def scaling(cfg, out: Path, workers: list[int], method: str, iters: int) -> dict:
    """One Ray Train run per worker count; samples/s per worker and in total from ``ray_work.jsonl``."""
    import ray

    from plsynth.data.datasets import build_splits
    from plsynth.training.ray_train import train_on_ray

    cfg = cfg.replace(train=dataclasses.replace(cfg.train, method=method, max_iters=iters, epochs=1, threads=1,
                                                checkpoint_every=0, device="cpu"))
    ray.init(num_cpus=max(workers), include_dashboard=False, log_to_driver=False)
    rows = []
    try:
        for n in workers:
            run_out = out / f"scaling-{method}-{n}w-{time.strftime('%Y%m%d-%H%M%S')}"
            run_cfg = cfg.replace(ray=dataclasses.replace(cfg.ray, num_workers=n, cpus_per_worker=1.0))
            build_splits(run_cfg, run_out)  # in the driver, as the entry points do
            t0 = time.perf_counter()
            train_on_ray(run_cfg, run_out, name=run_out.name)
            wall = time.perf_counter() - t0
            work = [json.loads(line) for line in (run_out / "ray_work.jsonl").read_text().splitlines()]
            per_worker = []
            for w in sorted(work, key=lambda w: w["rank"]):
                seen = w["samples"]["labeled"] + w["samples"]["unlabeled"]
                per_worker.append({"rank": w["rank"], "samples": seen, "train_s": w["train_s"],
                                   "cpu_s_per_step": w["train_cpu_s"] / iters,
                                   "samples_per_s": seen / w["train_s"], "samples_per_step": seen / iters})
            total = sum(w["samples"] for w in per_worker)
            rows.append({"workers": n, "steps": iters, "samples": total, "run_wall_s": wall,
                         "train_s": max(w["train_s"] for w in per_worker),
                         "samples_per_s_total": total / max(w["train_s"] for w in per_worker),
                         "per_worker": per_worker, "out": str(run_out)})
    finally:
        ray.shutdown()
    return {"method": method, "iters": iters, "rows": rows}


def write_scaling(result: dict, cfg, argv_line: str) -> list[str]:
    load = Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").is_file() else ["?"] * 3
    lines = [
        "# Data-parallel scaling under Ray Train (bench/ray_bench.py --workers)",
        "",
        f"Command: `{argv_line}` ({time.strftime('%Y-%m-%d %H:%M')} UTC, {__import__('os').cpu_count()} CPUs, "
        f"load average at the end {' '.join(load)}).",
        f"`{result['method']}`, {result['iters']} steps, global batch {cfg.train.batch_labeled} labeled + "
        f"{cfg.train.batch_unlabeled} unlabeled, {cfg.data.image_size} px phantoms, U-Net width {cfg.model.width}; "
        "each worker 1 torch thread, 1 Ray CPU. Seconds are each worker's time in optimizer steps (no validation); "
        "CPU seconds are its process's CPU time in them (the work it did, whatever else runs on the machine).",
        "",
        "| workers | slices per step per worker | CPU s per step per worker | samples/s per worker | "
        "samples/s total | train s | run wall s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        per_step = " / ".join(f"{w['samples_per_step']:.0f}" for w in r["per_worker"])
        per_s = " / ".join(f"{w['samples_per_s']:.2f}" for w in r["per_worker"])
        cpu = " / ".join(f"{w['cpu_s_per_step']:.2f}" for w in r["per_worker"])
        lines.append(f"| {r['workers']} | {per_step} | {cpu} | {per_s} | {r['samples_per_s_total']:.2f} | "
                     f"{r['train_s']:.1f} | {r['run_wall_s']:.1f} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "semiseg-cpu.yaml"))
    parser.add_argument("--iters", type=int, default=8)
    parser.add_argument("--out", default=str(REPO / "runs" / "ray_bench"))
    parser.add_argument("--set", action="append", default=[], dest="overrides")
    parser.add_argument("--workers", type=int, nargs="+", help="data-parallel scaling: Ray Train runs with these "
                        "worker counts (instead of the synthesis comparison)")
    parser.add_argument("--method", default="cps", help="with --workers: the method to train")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    import ray

    from plsynth.torch_setup import flush_denormals

    flush_denormals()  # as every plsynth entry point that runs networks does

    from plsynth.config import load_config
    from plsynth.data.datasets import build_splits
    from plsynth.synth_service.actor import ActorSynthesisClient, kill_actor, start_synthesis_actors
    from plsynth.synth_service.local import LocalSynthesizer

    overrides = ["data.layout=phantom", "data.root=''", "ray.synth_backend=ort", "synth.backend=ort", *args.overrides]
    cfg = load_config(args.config, overrides)
    threads = cfg.train.threads or 2
    torch.set_num_threads(threads)
    out = Path(args.out).resolve()
    if args.workers:
        result = scaling(cfg, out, args.workers, args.method, args.iters)
        lines = write_scaling(result, cfg, "python bench/ray_bench.py " + " ".join(argv if argv is not None else sys.argv[1:]))
        return write_results("ray_scaling", lines, result)
    bundle = untrained_bundle(cfg, out / "synth")
    cfg = cfg.replace(synth=dataclasses.replace(cfg.synth, bundle=str(bundle)))
    data = build_splits(cfg, out / "data-run")
    results: dict = {"config": args.config, "overrides": overrides, "iters": args.iters, "threads": threads,
                     "image_size": cfg.data.image_size, "batch": [cfg.train.batch_labeled, cfg.train.batch_unlabeled],
                     "cpus": __import__("os").cpu_count()}
    stamp = time.strftime("%Y%m%d-%H%M%S")

    cps = cfg.replace(train=dataclasses.replace(cfg.train, method="cps"))
    results["cps"] = run(cps, out / f"cps-{stamp}", data, None, args.iters)
    sa = cfg.replace(train=dataclasses.replace(cfg.train, method="sa-cps"))
    local = LocalSynthesizer(bundle, backend="ort", seed=0, threads=threads)
    results["sa_cps_local"] = run(sa, out / f"sa-local-{stamp}", data, TimedClient(local), args.iters)

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        actors = start_synthesis_actors(cfg, str(bundle), name="bench-synth")
        client = ActorSynthesisClient("bench-synth")
        results["actor_backend"] = client.backend
        results["sa_cps_actor"] = run(sa.replace(synth=dataclasses.replace(sa.synth, backend="service")),
                                      out / f"sa-actor-{stamp}", data, TimedClient(client), args.iters)
        results["actor_stats"] = client.stats()
        results["round_trip"] = round_trip(client, local, cfg.train.batch_unlabeled, cfg.data.image_size)
        kill_actor("bench-synth")
        del actors
    finally:
        ray.shutdown()
    a, loc, c = results["sa_cps_actor"], results["sa_cps_local"], results["cps"]
    rt = results["round_trip"]
    lines = [
        "# Ray synthesis actor vs in-process decoder vs CPS (bench/ray_bench.py)",
        "",
        f"Command: `.venv/bin/python bench/ray_bench.py --iters {args.iters}` ({time.strftime('%Y-%m-%d %H:%M')}, "
        f"{results['cpus']} CPUs shared with other jobs, torch threads {threads}).",
        f"Preset `{Path(args.config).name}` sizes: {cfg.data.image_size} px, U-Net width {cfg.model.width}, "
        f"batch {cfg.train.batch_labeled}+{cfg.train.batch_unlabeled}, synthesizer width {cfg.synth.width}, "
        f"style {cfg.synth.style_dim}; phantom data, untrained synthesizer bundle, decoder on ONNX Runtime "
        f"(actor: `{results['actor_backend']}`). Medians over iterations 2..{args.iters}.",
        "",
        "| | iteration (s) | synthesis per iteration (s) | synthesis share |",
        "|---|---|---|---|",
        f"| CPS (no synthesis) | {c['iter_s_median']:.3f} | - | - |",
        f"| SA-CPS, decoder in-process | {loc['iter_s_median']:.3f} | {loc['synth_s_median']:.3f} | "
        f"{100 * loc['synth_share']:.1f} % |",
        f"| SA-CPS, synthesis actor | {a['iter_s_median']:.3f} | {a['synth_s_median']:.3f} | "
        f"{100 * a['synth_share']:.1f} % |",
        "",
        f"Round trip of one request ({rt['batch']} slices): in-process {rt['local_s'] * 1000:.1f} ms, "
        f"actor {rt['actor_s'] * 1000:.1f} ms, overhead {rt['overhead_s'] * 1000:.1f} ms; "
        f"actor throughput = {100 * rt['actor_throughput_vs_local']:.0f} % of in-process (target >= 90 %).",
        f"Synthesis share of an SA-CPS iteration through the actor: {100 * a['synth_share']:.1f} % (target <= 25 %).",
        f"Actor counters: {a and results['actor_stats']['requests']} requests, {results['actor_stats']['slices']} slices, "
        f"{results['actor_stats']['decode_calls']} decoder calls, mean batch {results['actor_stats']['mean_batch']:.1f}.",
    ]
    return write_results("ray_bench", lines, results)


def write_results(name: str, lines: list[str], data: dict, target: Path = REPO / "bench" / "results") -> int:
    """<target>/<name>.md (the table) and .json (everything), and the table on stdout."""
    target.mkdir(parents=True, exist_ok=True)
    (target / f"{name}.md").write_text("\n".join(lines) + "\n")
    (target / f"{name}.json").write_text(json.dumps(data, indent=2, default=str))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
