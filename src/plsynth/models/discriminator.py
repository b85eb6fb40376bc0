"""Multi-scale PatchGAN discriminator (pix2pixHD / SPADE / SEAN), used only to train the synthesizer.

Input: one-hot map (B, 4, S, S) concatenated with an image (B, 1, S, S) in [-1, 1].
Each scale is a PatchGAN: 4x4 convs with strides 2, 2, 2 (``n_layers`` = 3), then 1, then a
4x4 conv to one channel; spectral norm + InstanceNorm on the middle convs, LReLU 0.2. Scale
k + 1 sees the input average-pooled by 3x3 / stride 2. ``forward`` returns, per scale, the
list of every layer's output (the last one is the patch score), as feature matching needs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import spectral_norm


class PatchDiscriminator(nn.Module):
    def __init__(self, in_channels: int, width: int, n_layers: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = [
            nn.Sequential(nn.Conv2d(in_channels, width, 4, stride=2, padding=2), nn.LeakyReLU(0.2))
        ]
        channels = width
        for n in range(1, n_layers + 1):
            previous, channels = channels, min(channels * 2, 512)
            stride = 1 if n == n_layers else 2
            layers.append(
                nn.Sequential(
                    spectral_norm(nn.Conv2d(previous, channels, 4, stride=stride, padding=2, bias=False)),
                    nn.InstanceNorm2d(channels),
                    nn.LeakyReLU(0.2),
                )
            )
        layers.append(nn.Conv2d(channels, 1, 4, stride=1, padding=2))
        self.layers = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outputs = []
        for layer in self.layers:
            x = layer(x)
            outputs.append(x)
        return outputs


class MultiScaleDiscriminator(nn.Module):
    def __init__(self, num_scales: int = 2, width: int = 64, in_channels: int = 5, n_layers: int = 3) -> None:
        super().__init__()
        self.scales = nn.ModuleList(PatchDiscriminator(in_channels, width, n_layers) for _ in range(num_scales))

    def forward(self, onehot: torch.Tensor, image: torch.Tensor) -> list[list[torch.Tensor]]:
        x = torch.cat([onehot, image], dim=1)
        results = []
        for i, scale in enumerate(self.scales):
            if i:
                x = F.avg_pool2d(x, 3, stride=2, padding=1, count_include_pad=False)
            results.append(scale(x))
        return results


def hinge_d_loss(real: list[list[torch.Tensor]], fake: list[list[torch.Tensor]]) -> torch.Tensor:
    """Discriminator hinge loss, mean over scales: relu(1 - D(real)) + relu(1 + D(fake))."""
    terms = [F.relu(1 - r[-1]).mean() + F.relu(1 + f[-1]).mean() for r, f in zip(real, fake)]
    return torch.stack(terms).mean()


def hinge_g_loss(fake: list[list[torch.Tensor]]) -> torch.Tensor:
    """Generator hinge loss, mean over scales: -D(fake)."""
    return torch.stack([-f[-1].mean() for f in fake]).mean()


def feature_matching_loss(real: list[list[torch.Tensor]], fake: list[list[torch.Tensor]]) -> torch.Tensor:
    """L1 between the discriminator's intermediate features of fake and (detached) real, as SEAN.

    Summed over layers, averaged over scales (SEAN: ``GAN_Feat_loss`` divided by num_D).
    """
    total = fake[0][0].new_zeros(())
    for r, f in zip(real, fake):
        for rf, ff in zip(r[:-1], f[:-1]):
            total = total + F.l1_loss(ff, rf.detach())
    return total / len(fake)
