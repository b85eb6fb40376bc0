"""The 2D U-Net segmenter (the paper's baseline network, Ronneberger et al. 2015).

Transposed-convolution up-sampling as in the original; instance norm (the authors' code, nnU-Net)
or the original's batch norm (`model.norm`); `width` channels at the first level, doubled at each
of `depth` levels. One logit channel: infection vs background.
"""

from __future__ import annotations

import torch
from torch import nn

from plsynth.config import UNetConfig


def _norm(kind: str, channels: int) -> nn.Module:
    return nn.InstanceNorm2d(channels, affine=True) if kind == "instance" else nn.BatchNorm2d(channels)


class DoubleConv(nn.Sequential):
    def __init__(self, in_channels: int, out_channels: int, norm: str, dropout: float = 0.0) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
            _norm(norm, out_channels),
            nn.ReLU(inplace=True),
            nn.Dropout2d(dropout) if dropout > 0 else nn.Identity(),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
            _norm(norm, out_channels),
            nn.ReLU(inplace=True),
        )


class Up(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, norm: str) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(in_channels, out_channels, 2, stride=2)
        self.conv = DoubleConv(2 * out_channels, out_channels, norm)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.cat([skip, self.up(x)], dim=1))


class UNet(nn.Module):
    """2D U-Net: ``(B, in_channels, H, W) -> (B, out_channels, H, W)`` logits.

    H and W must be multiples of ``2**depth`` (every max-pool halves an even size).
    """

    def __init__(self, config: UNetConfig = UNetConfig(), in_channels: int = 1, out_channels: int = 1) -> None:
        super().__init__()
        self.config = config
        widths = [config.width * 2**level for level in range(config.depth + 1)]
        self.inc = DoubleConv(in_channels, widths[0], config.norm)
        self.downs = nn.ModuleList(
            nn.Sequential(nn.MaxPool2d(2), DoubleConv(widths[i], widths[i + 1], config.norm, config.dropout))
            for i in range(config.depth)
        )
        self.ups = nn.ModuleList(Up(widths[i + 1], widths[i], config.norm) for i in reversed(range(config.depth)))
        self.head = nn.Conv2d(widths[0], out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = [self.inc(x)]
        for down in self.downs:
            skips.append(down(skips[-1]))
        h = skips.pop()
        for up in self.ups:
            h = up(h, skips.pop())
        return self.head(h)


def unets_from_states(config: UNetConfig, states: dict[str, dict], device: str = "cpu") -> dict[str, UNet]:
    """The named U-Nets of a checkpoint or bundle, rebuilt from ``config`` and their state dicts, in eval mode.

    The one place a U-Net is rebuilt from saved weights (bundle writing, export, teachers, inference).
    """
    nets = {}
    for name, state in states.items():
        net = UNet(config)
        net.load_state_dict(state)
        nets[name] = net.to(device).eval()
    return nets
