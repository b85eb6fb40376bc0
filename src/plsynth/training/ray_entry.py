"""Ray job entry points ``train_sa_cps`` and ``train_sa_st`` (console scripts and ``python -m``).

    ray job submit --working-dir . -- train_sa_cps --config configs/phantom-smoke.yaml --out /abs/runs/x
    train_sa_cps --config configs/phantom-smoke.yaml --out runs/x          # no cluster: embedded local Ray
    python -m plsynth.training.ray_entry sa-st --config ... --out ...

What a run does (see docs/ray-guide.md):

1. join Ray: ``ray.address``, else ``RAY_ADDRESS`` (set by ``ray job submit``), else a cluster
   started with ``ray start`` on this machine, else start an embedded local Ray (logged);
2. train the synthesizer into ``OUT/synth`` when ``synth.bundle`` is empty or missing (a
   one-worker Ray Train run, so it gets a GPU worker on a GPU cluster);
3. build the data once in the driver (phantoms, slice cache), so workers only read it;
4. start the named synthesis actor(s) and hand their client to every Ray Train worker;
5. SA-CPS: TorchTrainer runs the one training loop, calling the actor every iteration.
   SA-ST: train a baseline teacher first when ``train.teacher`` is empty (``OUT/teacher``, a
   Ray Train run with ``ray.num_workers`` workers),
   synthesize the pseudo-labeled set offline with ``ray.synth_actors`` actors into shards,
   then TorchTrainer trains the student on them;
6. ``OUT/bundle`` is written by rank 0; ``OUT/ray_summary.json`` records the Ray mode, the
   actor's back-end and counters, and timings.

Every failure exits non-zero with the codes of ``plsynth.errors.ExitCode`` (usage or config 2,
bundle 4, OUT locked by another run 6, anything else 70), so ``ray job submit`` reports the job
FAILED. Relative ``--out`` paths are resolved against the current folder,
which under ``ray job submit --working-dir`` is a temporary copy: give jobs an absolute --out.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from plsynth.training.cli import ConfigOpt

log = logging.getLogger("plsynth.training.ray_entry")


def connect_ray(address: str = "", namespace: str | None = None) -> str:
    """Join or start Ray; returns ``"cluster"`` or ``"local"`` (which one is also logged)."""
    import ray

    from plsynth.synth_service.actor import NAMESPACE

    namespace = namespace or NAMESPACE
    if ray.is_initialized():
        return "existing"
    target = address or os.environ.get("RAY_ADDRESS", "")
    if target:
        ray.init(address=target, namespace=namespace, log_to_driver=True)
        log.info("joined the Ray cluster at %s", target)
        return "cluster"
    try:
        ray.init(address="auto", namespace=namespace)
        log.info("joined the Ray cluster started with `ray start` on this machine")
        return "cluster"
    except ConnectionError:
        pass
    ray.init(namespace=namespace)  # with the dashboard: Ray Train's state API needs it
    log.info("no Ray cluster found (RAY_ADDRESS unset, no `ray start`): started an embedded local Ray with %s CPUs",
             ray.cluster_resources().get("CPU"))
    return "local"


def ensure_synth_bundle(cfg, out: Path):
    """``cfg`` with ``synth.bundle`` pointing at a usable bundle, training one into OUT/synth if needed."""
    bundle = Path(cfg.synth.bundle) if cfg.synth.bundle else None
    if bundle is not None and (bundle / "meta.json").is_file():
        return cfg
    if bundle is not None:
        log.warning("synth.bundle %s has no meta.json; training a synthesizer into %s", bundle, out / "synth")
    existing = out / "synth" / "bundle"
    if (existing / "meta.json").is_file():
        log.info("reusing the synthesizer bundle %s", existing)
    else:
        from plsynth.training.ray_train import synthesizer_worker, train_on_ray

        log.info("synth.bundle is empty: training the synthesizer into %s first (Ray Train, 1 worker)", out / "synth")
        # The GAN trains on one worker (its data-parallel form is not built); resumes from OUT/synth.
        one = cfg.replace(ray=dataclasses.replace(cfg.ray, num_workers=1))
        train_on_ray(one, out / "synth", loop_fn=synthesizer_worker, name=f"{cfg.name}-synth")
        if not (existing / "meta.json").is_file():
            raise RuntimeError(f"{out / 'synth'}: the synthesizer run finished without a bundle")
    return cfg.replace(synth=dataclasses.replace(cfg.synth, bundle=str(Path(existing).resolve())))


def train_with_synthesis_service(cfg, out: Path) -> dict:
    """Both entry points (``cfg.train.method`` sa-cps or sa-st): Ray Train with the synthesis
    actors; returns the summary also written to OUT/ray_summary.json."""
    import ray

    from plsynth.atomic import atomic_write_text
    from plsynth.synth_service.actor import ActorPool, kill_actor, start_synthesis_actors
    from plsynth.training.ray_train import train_on_ray

    t0 = time.perf_counter()
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    mode = connect_ray(cfg.ray.address)
    import plsynth

    summary: dict = {"method": cfg.train.method, "out": str(out), "ray_mode": mode,
                     "ray_address": ray.get_runtime_context().gcs_address, "code": str(Path(plsynth.__file__).parent)}
    names = []
    try:
        cfg = ensure_synth_bundle(cfg, out)
        cfg = cfg.replace(synth=dataclasses.replace(cfg.synth, backend="service"))
        from plsynth.data.datasets import build_splits

        data = build_splits(cfg, out)  # once, here: workers then read the cache instead of racing to write it
        summary["data"] = {"labeled": len(data.labeled), "unlabeled": len(data.unlabeled), "val": len(data.val)}
        if cfg.train.method == "sa-st" and not cfg.train.teacher:
            teacher_cfg = cfg.replace(train=dataclasses.replace(cfg.train, method="baseline"))
            log.info("train.teacher is empty: training a baseline teacher into %s first", out / "teacher")
            build_splits(teacher_cfg, out / "teacher")
            train_on_ray(teacher_cfg, out / "teacher", name=f"{cfg.name}-teacher")
            cfg = cfg.replace(train=dataclasses.replace(cfg.train, teacher=str(out / "teacher" / "bundle")))
        actors = start_synthesis_actors(cfg, cfg.synth.bundle)
        names = _actor_names(len(actors))
        pool = ActorPool(actors, names[0], retries=cfg.ray.synth_retries)
        client = pool.client
        summary["synth"] = {"bundle": cfg.synth.bundle, "backend": client.backend, "actors": len(actors),
                            "bundle_sha256": client.bundle_sha256}
        log.info("synthesis: %d actor(s), back-end %s", len(actors), client.backend)
        if cfg.train.method == "sa-st":
            from plsynth.training.self_training import load_teacher, make_offline_set

            teacher, fingerprint, view = load_teacher(cfg.train.teacher)
            t_offline = time.perf_counter()
            offline = make_offline_set(teacher, data.unlabeled, pool, out / "offline", cfg.train, fingerprint=fingerprint,
                                       view=view)
            summary["offline"] = {"shards": len(offline.manifest["shards"]), "seconds": time.perf_counter() - t_offline}
        t_train = time.perf_counter()
        result = train_on_ray(cfg, out, synth=client)
        summary["train_s"] = time.perf_counter() - t_train
        summary["metrics"] = {k: v for k, v in (result.metrics or {}).items() if isinstance(v, (int, float, str))}
        summary["checkpoint"] = getattr(result.checkpoint, "path", None)
        summary["synth"]["stats"] = client.stats()
        summary["bundle"] = str(out / "bundle")
        if not (out / "bundle").is_dir():
            raise RuntimeError(f"{out}: training finished but wrote no bundle")
    finally:
        for name in names:
            kill_actor(name)
        summary["seconds"] = time.perf_counter() - t0
        atomic_write_text(out / "ray_summary.json", json.dumps(summary, indent=2, default=str))
        if mode == "local":
            ray.shutdown()
    return summary


def _actor_names(count: int) -> list[str]:
    from plsynth.synth_service.actor import ACTOR_NAME

    return [ACTOR_NAME if i == 0 else f"{ACTOR_NAME}-{i}" for i in range(count)]


def _command(method: str):
    def command(
        config: ConfigOpt,
        out: Annotated[Optional[Path], typer.Option("--out", help="Run folder; default runs/<name>-<method>. "
                                                    "Use an absolute path under `ray job submit`.")] = None,
        set_: Annotated[Optional[list[str]], typer.Option("--set", help="Dotted override, e.g. "
                                                          "--set ray.num_workers=2 (repeatable).")] = None,
        address: Annotated[str, typer.Option("--address", help="Ray address; default ray.address, RAY_ADDRESS, "
                                             "a local `ray start`, else an embedded Ray.")] = "",
        device: Annotated[Optional[str], typer.Option("--device", help="auto, cuda or cpu (default train.device); "
                                                      "cuda gives every Ray Train worker a GPU.")] = None,
        verbose: Annotated[bool, typer.Option("--verbose", help="Print the traceback of an unexpected error.")] = False,
    ) -> None:
        from plsynth.atomic import folder_lock
        from plsynth.config import load_config
        from plsynth.torch_setup import flush_denormals

        flush_denormals()  # before the first parallel op creates torch's thread pool
        cfg = load_config(config, [*(set_ or []), *([f"train.device={device}"] if device else [])])
        if address:
            cfg = cfg.replace(ray=dataclasses.replace(cfg.ray, address=address))
        folder = out or Path("runs") / f"{cfg.name}-{method}"
        with folder_lock(folder, f"train_{method.replace('-', '_')}"):  # a second run into OUT: exit 6
            summary = train_with_synthesis_service(cfg.replace(train=dataclasses.replace(cfg.train, method=method)),
                                                   folder)
        typer.echo(f"{method} bundle: {summary['bundle']}")

    command.__doc__ = f"""Train {method} with Ray Train and the synthesis actor; leaves OUT/bundle.

    Example: ray job submit --working-dir . -- train_{method.replace('-', '_')} --config configs/phantom-smoke.yaml
    """
    return command


def main(method: str, argv: list[str] | None = None) -> int:
    """Run one entry point; returns the exit code of ``plsynth.errors.ExitCode`` (0 when it worked)."""
    from plsynth.errors import run_app

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    app.command()(_command(method))
    return run_app(app, f"train_{method.replace('-', '_')}", argv)


def train_sa_cps() -> None:
    """Console script ``train_sa_cps``."""
    sys.exit(main("sa-cps"))


def train_sa_st() -> None:
    """Console script ``train_sa_st``."""
    sys.exit(main("sa-st"))


if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in ("sa-cps", "sa-st"):
        from plsynth.errors import ExitCode

        sys.stderr.write("usage: python -m plsynth.training.ray_entry {sa-cps,sa-st} --config FILE [--out DIR]\n")
        sys.exit(ExitCode.USAGE)
    sys.exit(main(sys.argv[1], sys.argv[2:]))
