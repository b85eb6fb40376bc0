"""The synthesis actor on a real local Ray cluster (2 CPUs, the actor takes 0.25).

The decoder here is a tiny torch module defined in this file (a real network, not a mock:
the actor batches, splits and resizes whatever it returns); the real SEAN decoder bundle is
exercised through the same factory protocol in test_ray_jobs.py.
"""

from __future__ import annotations

import sys
import threading
import time

import numpy as np
import pytest

ray = pytest.importorskip("ray")
torch = pytest.importorskip("torch")

from _fixtures import write_synth_bundle  # noqa: E402
from plsynth.synth_service.actor import (  # noqa: E402
    ActorSynthesisClient,
    SynthesisActor,
    get_or_create_actor,
    kill_actor,
)
from plsynth.synth_service.protocol import SynthesisClient  # noqa: E402

pytestmark = pytest.mark.ray
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the actor process cannot import tests/


class TinyDecoder:
    """4-class one-hot + per-request style -> (B,1,S,S) in [0,1], deterministic; optional delay per call."""

    backend = "torch:cpu"
    bundle_sha256 = "0" * 64

    def __init__(self, size: int = 16, delay_s: float = 0.0) -> None:
        torch.manual_seed(0)
        self.size, self.delay_s = size, delay_s
        self.net = torch.nn.Conv2d(4 + 4, 1, 3, padding=1)

    def condition(self, infection, lung, images, seed):
        lung = lung.long()
        semantic = torch.where(infection[:, 0] > 0.5, torch.full_like(lung, 3), lung)
        semantic = torch.nn.functional.interpolate(semantic[:, None].float(), size=(self.size, self.size),
                                                   mode="nearest")[:, 0].long()
        onehot = torch.nn.functional.one_hot(semantic, 4).permute(0, 3, 1, 2).float()
        gen = torch.Generator().manual_seed(0 if seed is None else int(seed))
        style = torch.rand(1, 4, 4, generator=gen).expand(lung.shape[0], 4, 4)  # one style per request
        return onehot, style

    def decode(self, onehot, style, noise_seed):
        if self.delay_s:
            time.sleep(self.delay_s)
        style_map = torch.einsum("bchw,bcd->bdhw", onehot, style)
        return torch.sigmoid(self.net(torch.cat([onehot, style_map], 1)))


def make_tiny(delay_s: float = 0.0):
    return lambda: TinyDecoder(delay_s=delay_s)


def make_batch(n: int, size: int = 24, seed: int = 0):
    rng = np.random.default_rng(seed)
    lung = np.zeros((n, size, size), np.int64)
    lung[:, 4:20, 2:11] = 2  # patient right lung on the image's left (radiological view)
    lung[:, 4:20, 13:22] = 1
    infection = ((rng.random((n, 1, size, size)) > 0.7) & (lung[:, None] > 0)).astype(np.float32)
    return infection, lung


def test_two_concurrent_callers_share_one_decode_whose_batch_is_the_sum_of_theirs(ray_local):
    actor = get_or_create_actor(make_tiny(), name="t-batch", num_cpus=0.25, gather_ms=300, max_batch=32)
    try:
        a_inf, a_lung = make_batch(3, seed=1)
        b_inf, b_lung = make_batch(5, seed=2)
        ra = actor.synthesize.remote(a_inf, a_lung, None, 11)
        rb = actor.synthesize.remote(b_inf, b_lung, None, 22)
        out_a, out_b = ray.get([ra, rb])
        stats = ray.get(actor.stats.remote())
        assert stats["decode_calls"] == 1 and stats["batch_sizes"] == [8]
        assert stats["requests"] == 2 and stats["slices"] == 8
        assert out_a.shape == (3, 1, 24, 24) and out_b.shape == (5, 1, 24, 24)  # resized back to the request size
        assert out_a.dtype == np.float32 and 0.0 <= out_a.min() and out_a.max() <= 1.0

        # each caller got its own slices back: the same requests served alone give the same images
        alone_a = ray.get(actor.synthesize.remote(a_inf, a_lung, None, 11))
        alone_b = ray.get(actor.synthesize.remote(b_inf, b_lung, None, 22))
        np.testing.assert_allclose(out_a, alone_a, atol=1e-5)
        np.testing.assert_allclose(out_b, alone_b, atol=1e-5)
        assert not np.allclose(out_a[0], out_b[0])
        assert ray.get(actor.stats.remote())["decode_calls"] == 3
    finally:
        kill_actor("t-batch")


def test_batches_never_exceed_max_batch(ray_local):
    actor = get_or_create_actor(make_tiny(), name="t-max", num_cpus=0.25, gather_ms=300, max_batch=6)
    try:
        refs = [actor.synthesize.remote(*make_batch(4, seed=i), None, i) for i in range(3)]
        outs = ray.get(refs)
        sizes = ray.get(actor.stats.remote())["batch_sizes"]
        assert sum(sizes) == 12 and max(sizes) <= 6
        assert [o.shape[0] for o in outs] == [4, 4, 4]
    finally:
        kill_actor("t-max")


def test_named_actor_is_reused_and_client_reports_backend_and_counters(ray_local):
    first = get_or_create_actor(make_tiny(), name="t-named", num_cpus=0.25, gather_ms=1)
    try:
        second = get_or_create_actor(make_tiny(), name="t-named", num_cpus=0.25, gather_ms=1)
        assert ray.get(first.info.remote())["pid"] == ray.get(second.info.remote())["pid"]
        client = ActorSynthesisClient("t-named")
        assert isinstance(client, SynthesisClient)
        assert client.backend == "torch:cpu" and client.bundle_sha256 == "0" * 64
        inf, lung = make_batch(2)
        out = client.synthesize(torch.from_numpy(inf), torch.from_numpy(lung), seed=3)
        assert isinstance(out, torch.Tensor) and out.shape == (2, 1, 24, 24) and out.dtype == torch.float32
        stats = client.stats()
        assert stats["requests"] == 1 and stats["slices"] == 2 and stats["decode_s"] > 0
        with pytest.raises(ValueError, match="expected infection"):
            client.synthesize(torch.from_numpy(inf[:, 0]), torch.from_numpy(lung))
    finally:
        kill_actor("t-named")


def test_killed_actor_restarts_and_an_in_flight_caller_retries(ray_local):
    actor = get_or_create_actor(make_tiny(delay_s=1.5), name="t-kill", num_cpus=0.25, gather_ms=1, max_restarts=2)
    try:
        pid_before = ray.get(actor.info.remote())["pid"]
        client = ActorSynthesisClient("t-kill", retries=6, backoff_s=0.3)
        inf, lung = make_batch(2)
        result: dict = {}
        caller = threading.Thread(target=lambda: result.update(out=client.synthesize(
            torch.from_numpy(inf), torch.from_numpy(lung), seed=1)))
        caller.start()
        time.sleep(0.7)  # the call is now inside the 1.5 s decode
        ray.kill(actor, no_restart=False)
        caller.join(timeout=60)
        assert "out" in result and result["out"].shape == (2, 1, 24, 24)
        assert client.retried >= 1
        assert ray.get(actor.info.remote())["pid"] != pid_before  # a new process serves it
    finally:
        kill_actor("t-kill")


def test_client_gives_up_after_bounded_retries_when_actor_is_gone(ray_local):
    handle = get_or_create_actor(make_tiny(), name="t-gone", num_cpus=0.25, max_restarts=0)  # noqa: F841 (kept alive)
    client = ActorSynthesisClient("t-gone", retries=2, backoff_s=0.05)
    kill_actor("t-gone")
    inf, lung = make_batch(1)
    t0 = time.perf_counter()
    with pytest.raises(RuntimeError, match="failed 3 times"):
        client.synthesize(torch.from_numpy(inf), torch.from_numpy(lung))
    assert client.retried == 2 and time.perf_counter() - t0 < 30


def test_actor_class_batches_without_ray():
    """The batching logic is plain asyncio: check it in-process too (fast, no cluster)."""
    import asyncio

    actor = SynthesisActor(make_tiny(), max_batch=16, gather_ms=50)

    async def both():
        a = actor.synthesize(*make_batch(2, seed=1), None, 1)
        b = actor.synthesize(*make_batch(3, seed=2), None, 2)
        return await asyncio.gather(a, b)

    out_a, out_b = asyncio.run(both())
    assert out_a.shape[0] == 2 and out_b.shape[0] == 3
    assert actor.stats()["batch_sizes"] == [5]


# ---------------------------------------------------------------------------------------------
# the real decoder bundle and the real training loop


REPO = __import__("pathlib").Path(__file__).resolve().parents[1]


def write_untrained_synth_bundle(path, cfg):
    return write_synth_bundle(path, cfg)[0]


def test_bundle_actor_serves_the_real_decoder_and_reports_its_backend(ray_local, tmp_path):
    from plsynth.config import load_config
    from plsynth.synth_service.actor import start_synthesis_actors

    cfg = load_config(REPO / "configs" / "phantom-smoke.yaml", ["ray.synth_backend=ort"])
    bundle = write_untrained_synth_bundle(tmp_path / "synth", cfg)
    actors = start_synthesis_actors(cfg, str(bundle), name="t-real")
    try:
        client = ActorSynthesisClient("t-real")
        assert client.backend == "ort:CPUExecutionProvider"
        inf, lung = make_batch(3, size=40)
        out = client.synthesize(torch.from_numpy(inf), torch.from_numpy(lung), seed=5)
        assert out.shape == (3, 1, 40, 40) and 0 <= float(out.min()) and float(out.max()) <= 1
        # same request, same seed, served alone: same images (pool draw and noise fixed by the seed)
        again = client.synthesize(torch.from_numpy(inf), torch.from_numpy(lung), seed=5)
        torch.testing.assert_close(out, again)
    finally:
        kill_actor("t-real")
        del actors


@pytest.mark.slow
def test_sa_cps_training_finishes_when_the_synthesis_actor_is_killed_mid_run(ray_local, tmp_path):
    """Two Ray Train workers call the actor every iteration; it is killed once after serving a
    request; Ray restarts it (max_restarts) and the workers' clients retry, so the run ends."""
    import dataclasses

    from plsynth.config import load_config
    from plsynth.data.datasets import build_splits
    from plsynth.synth_service.actor import start_synthesis_actors
    from plsynth.training.ray_train import train_on_ray

    cfg = load_config(REPO / "configs" / "phantom-smoke.yaml",
                      ["train.method=sa-cps", "train.epochs=1", "train.max_iters=4", "synth.backend=service",
                       "ray.num_workers=2", "ray.synth_backend=torch", "ray.synth_gather_ms=50", "train.threads=1"])
    bundle = write_untrained_synth_bundle(tmp_path / "synth", cfg)
    cfg = cfg.replace(synth=dataclasses.replace(cfg.synth, bundle=str(bundle)))
    out = tmp_path / "run"
    build_splits(cfg, out)
    actors = start_synthesis_actors(cfg, str(bundle), name="t-train")
    try:
        pid_before = ray.get(actors[0].info.remote())["pid"]
        client = ActorSynthesisClient("t-train", retries=8, backoff_s=0.5)
        killed = threading.Event()

        def kill_after_first_request():
            deadline = time.time() + 300
            while time.time() < deadline:
                try:
                    if ray.get(actors[0].stats.remote(), timeout=5)["requests"] >= 1:
                        ray.kill(actors[0], no_restart=False)
                        killed.set()
                        return
                except Exception:  # noqa: BLE001 - keep polling until the first request lands
                    pass
                time.sleep(0.2)

        killer = threading.Thread(target=kill_after_first_request, daemon=True)
        killer.start()
        result = train_on_ray(cfg, out, synth=client)
        killer.join(timeout=5)
        assert killed.is_set()
        assert result.metrics["step"] == 4
        assert (out / "bundle" / "meta.json").is_file()
        info = ray.get(actors[0].info.remote())
        assert info["pid"] != pid_before  # the restarted actor served the rest of the run
        assert ray.get(actors[0].stats.remote())["requests"] >= 1
        attempts = (out / "ray_attempts.jsonl").read_text().splitlines()
        assert len(attempts) == 2  # both workers started once: the actor's death did not fail the run
    finally:
        kill_actor("t-train")
