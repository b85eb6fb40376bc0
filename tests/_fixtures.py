"""The tiny configs, networks and bundles the tests build: one recipe each, so they cannot drift apart.

Everything here is real (real U-Nets and SEAN networks, real ONNX export and parity check);
only the sizes are tiny and the weights untrained, so a bundle is written in a second or two.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from plsynth.config import Config, DataConfig, SynthConfig, UNetConfig
from plsynth.models.unet import UNet

TINY_UNET = UNetConfig(width=4, depth=2)
TINY_SYNTH = SynthConfig(image_size=32, width=4, style_dim=8, num_up=3, pool_k=2)


def tiny_config(size: int = 32) -> Config:
    """A segmenter config at ``size`` px with a 4-wide, 2-level U-Net (everything else default)."""
    return Config(data=DataConfig(image_size=size), model=TINY_UNET)


def tiny_unet(seed: int, config: UNetConfig = TINY_UNET, varied_norm: bool = False) -> UNet:
    """An untrained U-Net from ``seed``, in eval mode.

    varied_norm: random instance-norm scales and shifts, so its masks are neither empty nor full.
    """
    torch.manual_seed(seed)
    net = UNet(config)
    if varied_norm:
        with torch.no_grad():
            for m in net.modules():
                if isinstance(m, torch.nn.InstanceNorm2d):
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.uniform_(-0.2, 0.2)
    return net.eval()


def write_tiny_bundle(out: Path, cfg: Config | None = None, seeds: tuple[int, ...] = (0, 1),
                      metrics: dict | None = None, extra: dict | None = None) -> Path:
    """A segmenter bundle of untrained tiny U-Nets: ``model`` (seeds[0]) and, with two seeds, ``peer``."""
    from plsynth.bundles.segmenter import write_bundle

    cfg = cfg or tiny_config()
    nets = {name: tiny_unet(seed, cfg.model) for name, seed in zip(("model", "peer"), seeds)}
    return write_bundle(out, nets, cfg, metrics or {}, extra)


def write_synth_bundle(path: Path, cfg: Config | None = None, has_infection: tuple[int, ...] = (1, 1, 1, 1),
                       varied: bool = False, texture: torch.Tensor | None = None):
    """A real synthesizer bundle (SEAN decoder + encoder, ONNX, a random style pool) with untrained weights.

    has_infection: one pool code per entry, flagged N+ where 1. varied: random noise weights and
    blends, so the export parity covers them. texture: residual patches for ``synth.texture``.
    Returns (bundle path, decoder).
    """
    from plsynth.bundles.style_pool import StylePool
    from plsynth.bundles.synthesizer import write_decoder_bundle
    from plsynth.models.sean import build_synthesizer

    cfg = cfg or Config(synth=TINY_SYNTH)
    torch.manual_seed(0)
    decoder, encoder = build_synthesizer(cfg.synth)
    if varied:
        with torch.no_grad():
            for name, p in decoder.named_parameters():
                if "noise_weight" in name or "blend" in name:
                    p.normal_()
    rng = np.random.default_rng(0)
    n = len(has_infection)
    c = decoder.num_classes
    pool = StylePool(codes=rng.uniform(-1, 1, (n, c, cfg.synth.style_dim)).astype(np.float32),
                     present=np.ones((n, c), bool), has_infection=np.array(has_infection, bool))
    return write_decoder_bundle(path, decoder, encoder, pool, cfg, texture=texture), decoder
