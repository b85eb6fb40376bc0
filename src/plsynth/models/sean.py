"""SEAN synthesizer networks: region-wise style encoder and decoder of SEAN residual blocks.

Clean-room reimplementation of SEAN (Zhu et al., CVPR 2020) as used by Lyu et al. (paper
section III-B); the differences from the official code (ZPdesu/SEAN, FeiLyu/SASSL) are listed below.

Tensors (C = 4 classes: 0 background, 1 patient-left lung, 2 patient-right lung, 3 infection;
C = 5 with ``synth.vessels``: 4 vessel; see
``plsynth.data.semantic``):
- ``onehot``: (B, C, S, S) float one-hot semantic map (``plsynth.data.semantic.one_hot``), S = image_size.
- ``style``: (B, C, D) float style matrix, one row per class, D = style_dim; a row of an absent
  class is all zero (paper: "set its column to zero").
- ``noise``: (B, 1, S, S) standard normal, or None. Every ACE layer reads it nearest-resampled
  to its own resolution (which keeps it N(0, 1)) and scales it per channel with a learned
  weight (initialised at 0, as SEAN). Passing it in, instead of drawing it inside the network,
  makes the decoder deterministic and exportable (ONNX/TensorRT) with inputs exactly
  (onehot, style[, noise]).
- images are 1-channel in [-1, 1] (the datasets' [0, 1] mapped by 2x - 1); output is tanh.

Differences from the official code, and why:
- Parameter-free normalisation is InstanceNorm (SPADE's ``spadeinstance``) rather than SyncBN:
  identical in train and eval, independent of the batch, so the exported decoder gives the same
  image for a slice whatever else is in the batch.
- Per-class style MLPs are one batched (C, D, D) weight (einsum), and the broadcast of per-class
  vectors over their regions is an einsum with the one-hot map: no Python loops over samples
  or classes. Only the 4 used MLPs exist (the official code carries 19).
- The 3x3 conv D -> channels of SEAN's style branch is factorised as a per-class linear
  projection D -> ``hidden`` before the broadcast, then a 3x3 conv hidden -> 2 * channels. A 1x1
  projection commutes with the broadcast, so this is SEAN's branch with a low-rank 3x3 kernel;
  it avoids (B, 512, H, W) style maps (1 GB per tensor at batch 8 / 256 px, measured: an ONNX
  Runtime forward of the full-rank branch peaked at 13.8 GB).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import spectral_norm

from plsynth.config import SynthConfig
from plsynth.data.semantic import map_classes


def hidden_width(config: SynthConfig) -> int:
    """Width of the SPADE and style branches inside each ACE (SEAN: 128 at width 64)."""
    return config.norm_hidden or min(128, 2 * config.width)


def resize_nearest(x: torch.Tensor, size: tuple[int, int] | torch.Size) -> torch.Tensor:
    """Nearest resize (one-hot maps, noise); a no-op at the same size."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="nearest")


def instance_norm(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Parameter-free instance norm (as ``nn.InstanceNorm2d(affine=False)``), spelled out so that
    the ONNX exporter never needs the channel count (which it loses after the noise addition)."""
    mean = x.mean(dim=(2, 3), keepdim=True)
    var = (x - mean).pow(2).mean(dim=(2, 3), keepdim=True)
    return (x - mean) * torch.rsqrt(var + eps)


def region_average(features: torch.Tensor, onehot: torch.Tensor) -> torch.Tensor:
    """Per-class mean of ``features`` (B, D, h, w) over the regions of ``onehot`` (B, C, H, W).

    The map is nearest-resized to (h, w). Returns (B, C, D); a class with no pixel at (h, w)
    gets an all-zero row. Batched: ``einsum`` over the one-hot map divided by the clamped area.
    """
    onehot = resize_nearest(onehot.to(features.dtype), features.shape[-2:])
    sums = torch.einsum("bdhw,bchw->bcd", features, onehot)
    area = onehot.sum(dim=(2, 3)).clamp(min=1.0)
    return sums / area.unsqueeze(-1)


class StyleEncoder(nn.Module):
    """Region-wise style encoder: image (B, 1, S, S) in [-1, 1] + one-hot -> style (B, C, D).

    SEAN's Zencoder layout: conv3x3, two stride-2 convs, one transposed conv back up, conv3x3 +
    tanh to D channels at S/2, then region-wise average pooling (``region_average``).
    ``width`` is the first conv's channels (SEAN: 32).
    """

    def __init__(self, style_dim: int, width: int, in_channels: int = 1) -> None:
        super().__init__()

        def block(conv: nn.Module, channels: int) -> list[nn.Module]:
            return [conv, nn.InstanceNorm2d(channels), nn.LeakyReLU(0.2)]

        self.style_dim = style_dim
        self.features = nn.Sequential(
            nn.ReflectionPad2d(1),
            *block(nn.Conv2d(in_channels, width, 3), width),
            *block(nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), 2 * width),
            *block(nn.Conv2d(2 * width, 4 * width, 3, stride=2, padding=1), 4 * width),
            *block(nn.ConvTranspose2d(4 * width, 8 * width, 3, stride=2, padding=1, output_padding=1), 8 * width),
            nn.ReflectionPad2d(1),
            nn.Conv2d(8 * width, style_dim, 3),
            nn.Tanh(),
        )

    def forward(self, image: torch.Tensor, onehot: torch.Tensor) -> torch.Tensor:
        return region_average(self.features(image), onehot)


class ACE(nn.Module):
    """SEAN's ACE normalisation for ``channels`` features.

    ``out = norm(x + noise * w_noise) * (1 + gamma) + beta`` where gamma/beta blend a style
    branch (per-class MLP of the style rows, broadcast over the class regions, 3x3 conv) and a
    SPADE branch (3x3 convs of the one-hot map) with learned weights ``sigmoid(a)`` (init 0.5).
    Without ``use_style`` only the SPADE branch is used (SEAN's last block).
    """

    def __init__(self, channels: int, style_dim: int, hidden: int, use_style: bool, use_noise: bool,
                 classes: int, noise_init: float = 0.0) -> None:
        super().__init__()
        self.use_style = use_style
        self.noise_weight = nn.Parameter(torch.full((channels,), noise_init)) if use_noise else None
        self.spade_shared = nn.Sequential(nn.Conv2d(classes, hidden, 3, padding=1), nn.ReLU())
        self.spade_gamma_beta = nn.Conv2d(hidden, 2 * channels, 3, padding=1)
        if use_style:
            # per-class MLP (SEAN: fc_mu0..3, D -> D, ReLU), then the low-rank projection D -> hidden
            self.style_weight = nn.Parameter(torch.empty(classes, style_dim, style_dim))
            self.style_bias = nn.Parameter(torch.zeros(classes, style_dim))
            nn.init.kaiming_uniform_(self.style_weight.view(classes * style_dim, style_dim), a=math.sqrt(5))
            self.style_project = nn.Linear(style_dim, hidden, bias=False)
            self.style_gamma_beta = nn.Conv2d(hidden, 2 * channels, 3, padding=1)
            self.blend_gamma = nn.Parameter(torch.zeros(()))
            self.blend_beta = nn.Parameter(torch.zeros(()))

    def forward(
        self, x: torch.Tensor, onehot: torch.Tensor, style: torch.Tensor, noise: torch.Tensor | None
    ) -> torch.Tensor:
        if self.noise_weight is not None and noise is not None:
            x = x + resize_nearest(noise, x.shape[-2:]) * self.noise_weight.view(1, -1, 1, 1)
        normalized = instance_norm(x)
        seg = resize_nearest(onehot, x.shape[-2:])
        gamma, beta = self.spade_gamma_beta(self.spade_shared(seg)).chunk(2, dim=1)
        if self.use_style:
            codes = F.relu(torch.einsum("bcd,cde->bce", style, self.style_weight) + self.style_bias)
            codes = self.style_project(codes)  # (B, C, hidden)
            style_map = torch.einsum("bce,bchw->behw", codes, seg)
            gamma_s, beta_s = self.style_gamma_beta(style_map).chunk(2, dim=1)
            a_g, a_b = torch.sigmoid(self.blend_gamma), torch.sigmoid(self.blend_beta)
            gamma = a_g * gamma_s + (1 - a_g) * gamma
            beta = a_b * beta_s + (1 - a_b) * beta
        return normalized * (1 + gamma) + beta


class SEANResBlock(nn.Module):
    """ACE -> LReLU -> conv3x3 -> ACE -> LReLU -> conv3x3, learned 1x1 shortcut when fin != fout.

    Convolutions carry spectral norm, as SEAN; ``fold_spectral_norm`` removes it for export.
    """

    def __init__(self, fin: int, fout: int, style_dim: int, hidden: int, use_style: bool, use_noise: bool,
                 classes: int, noise_init: float = 0.0) -> None:
        super().__init__()
        fmiddle = min(fin, fout)
        self.ace_0 = ACE(fin, style_dim, hidden, use_style, use_noise, classes, noise_init)
        self.conv_0 = spectral_norm(nn.Conv2d(fin, fmiddle, 3, padding=1))
        self.ace_1 = ACE(fmiddle, style_dim, hidden, use_style, use_noise, classes, noise_init)
        self.conv_1 = spectral_norm(nn.Conv2d(fmiddle, fout, 3, padding=1))
        self.learned_shortcut = fin != fout
        if self.learned_shortcut:
            self.ace_s = ACE(fin, style_dim, hidden, use_style, use_noise, classes, noise_init)
            self.conv_s = spectral_norm(nn.Conv2d(fin, fout, 1, bias=False))

    def forward(
        self, x: torch.Tensor, onehot: torch.Tensor, style: torch.Tensor, noise: torch.Tensor | None
    ) -> torch.Tensor:
        shortcut = self.conv_s(self.ace_s(x, onehot, style, noise)) if self.learned_shortcut else x
        h = self.conv_0(F.leaky_relu(self.ace_0(x, onehot, style, noise), 0.2))
        h = self.conv_1(F.leaky_relu(self.ace_1(h, onehot, style, noise), 0.2))
        return shortcut + h


def decoder_channels(config: SynthConfig) -> list[int]:
    """Output channels of each block: head, middle (x2) then one block per later up-sampling.

    SPADE "normal" generalised to ``num_up`` up-samplings: 16 * width until the last four
    blocks, which step down 8, 4, 2, 1 * width (num_up = 5 gives SEAN's 1024..64 at ngf 64).
    """
    w, n = config.width, config.num_up
    after_up = [w * 16 // 2 ** max(0, k - (n - 4)) for k in range(1, n + 1)]
    return [16 * w, after_up[0], after_up[0], *after_up[1:]]


class SEANDecoder(nn.Module):
    """Decoder (SEAN generator minus encoder): (onehot, style[, noise]) -> image (B, 1, S, S) in [-1, 1].

    The one-hot map is resized to S / 2**num_up and lifted to 16 * width channels by a 3x3
    conv; then a head block, ``num_up`` x2 up-samplings (``synth.upsample``) with SEAN residual blocks (two
    at the first up-sampled size, as SPADE's G_middle_0/1), the last one SPADE-only; then
    LReLU, conv3x3 to 1 channel and tanh.
    """

    def __init__(self, config: SynthConfig, out_channels: int = 1) -> None:
        super().__init__()
        self.config = config
        self.image_size = config.image_size
        self.start_size = config.image_size // 2**config.num_up
        self.uses_noise = config.noise
        hidden = hidden_width(config)
        chans = decoder_channels(config)
        self.num_classes = classes = map_classes(config.vessels)
        self.fc = nn.Conv2d(classes, chans[0], 3, padding=1)
        fins = [chans[0], *chans[:-1]]
        last = len(chans) - 1
        self.blocks = nn.ModuleList(
            SEANResBlock(fin, fout, config.style_dim, hidden, use_style=i != last, use_noise=config.noise, classes=classes,
                         noise_init=config.noise_init)
            for i, (fin, fout) in enumerate(zip(fins, chans))
        )
        # up-sample before block i (block 0 is the head at start_size, block 2 is the second middle block)
        self.upsample_before = [i not in (0, 2) for i in range(len(chans))]
        self.conv_img = nn.Conv2d(chans[-1], out_channels, 3, padding=1)

    def forward(self, onehot: torch.Tensor, style: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        x = self.fc(resize_nearest(onehot, (self.start_size, self.start_size)))
        for up, block in zip(self.upsample_before, self.blocks):
            if up:
                mode = self.config.upsample
                x = F.interpolate(x, scale_factor=2.0, mode=mode, align_corners=False if mode == "bilinear" else None)
            x = block(x, onehot, style, noise)
        return torch.tanh(self.conv_img(F.leaky_relu(x, 0.2)))

    def make_noise(self, batch: int, generator: torch.Generator | None = None, device: str | torch.device = "cpu"):
        """Standard normal noise (B, 1, S, S) for ``forward``; None when the config switches noise off."""
        if not self.uses_noise:
            return None
        return torch.randn((batch, 1, self.image_size, self.image_size), generator=generator, device=device)


def fold_spectral_norm(module: nn.Module) -> nn.Module:
    """Replace spectral-normalised weights by their current normalised value (in place).

    For export and inference: the result computes exactly what the module computes in eval
    mode, without the per-call division by sigma.
    """
    from torch.nn.utils import remove_spectral_norm

    for sub in module.modules():
        if hasattr(sub, "weight_orig"):
            remove_spectral_norm(sub)
    return module


def build_synthesizer(config: SynthConfig) -> tuple[SEANDecoder, StyleEncoder]:
    """The decoder and its style encoder (width / 2 as SEAN: ngf 64, encoder ngf 32)."""
    return SEANDecoder(config), StyleEncoder(config.style_dim, max(config.width // 2, 4))
