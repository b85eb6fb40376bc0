"""Multi-scale PatchGAN discriminator (pix2pixHD / SPADE / SEAN), used only to train the synthesizer.

Input: one-hot map (B, C, S, S) (C = 4 or 5 map classes) concatenated with an image (B, 1, S, S) in [-1, 1].
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


# -- OASIS: a per-pixel (N + 1)-class segmentation discriminator ---------------------------------


class SegmentationDiscriminator(nn.Module):
    """OASIS's discriminator (Sushko et al., ICLR 2021), small: a U-Net that labels every pixel of
    an image (B, 1, S, S) as one of the map's ``num_classes`` classes or as "fake" (the last channel).

    Being label-aware per pixel, it tells the generator *where* its image disagrees with the map
    (an infection drawn faintly is "fake" there), which the PatchGAN's (map, image) score does not.
    Encoder: ``depth`` stages of two spectral-normed 3x3 convs + LReLU, average-pooled by 2 after
    each but the last; decoder: nearest x2 up-sampling, concatenation with the skip, two convs.
    """

    def __init__(self, num_classes: int, width: int, depth: int = 4, in_channels: int = 1) -> None:
        super().__init__()

        def stage(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(
                spectral_norm(nn.Conv2d(cin, cout, 3, padding=1)), nn.LeakyReLU(0.2),
                spectral_norm(nn.Conv2d(cout, cout, 3, padding=1)), nn.LeakyReLU(0.2),
            )

        widths = [min(width * 2**i, 512) for i in range(depth)]
        self.down = nn.ModuleList(stage(cin, cout) for cin, cout in zip([in_channels, *widths[:-1]], widths))
        self.up = nn.ModuleList(stage(widths[i + 1] + widths[i], widths[i]) for i in reversed(range(depth - 1)))
        self.head = nn.Conv2d(widths[0], num_classes + 1, 1)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        skips, x = [], image
        for i, stage in enumerate(self.down):
            if i:
                x = F.avg_pool2d(x, 2)
            x = stage(x)
            skips.append(x)
        x = skips.pop()
        for stage in self.up:
            skip = skips.pop()
            x = stage(torch.cat([F.interpolate(x, size=skip.shape[-2:], mode="nearest"), skip], 1))
        return self.head(x)


def class_balanced_ce(logits: torch.Tensor, onehot: torch.Tensor, real: bool) -> torch.Tensor:
    """OASIS loss: per-pixel cross-entropy to the map's class (``real``) or to the fake class, each
    pixel weighted by the inverse frequency of its map class in the batch (small infections count)."""
    counts = onehot.sum(dim=(0, 2, 3))
    present = (counts > 0).sum().clamp(min=1)
    coefficients = torch.where(counts > 0, onehot[:, 0].numel() / (counts * present), torch.zeros_like(counts))
    weight = torch.einsum("c,bchw->bhw", coefficients, onehot)
    target = onehot.argmax(1) if real else torch.full_like(onehot[:, 0], onehot.shape[1], dtype=torch.long)
    return (F.cross_entropy(logits, target, reduction="none") * weight).mean()


def labelmix_loss(
    discriminator: nn.Module,
    real: torch.Tensor,
    fake: torch.Tensor,
    onehot: torch.Tensor,
    logits_real: torch.Tensor,
    logits_fake: torch.Tensor,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """OASIS LabelMix: each map class of each image comes from ``real`` or ``fake`` at random; the
    discriminator's logits of the mix must equal the same mix of its logits of the two (MSE)."""
    bits = torch.randint(0, 2, onehot.shape[:2], generator=generator).to(onehot)
    mask = torch.einsum("bc,bchw->bhw", bits, onehot)[:, None]
    mixed = mask * real + (1 - mask) * fake
    return F.mse_loss(discriminator(mixed), mask * logits_real + (1 - mask) * logits_fake)
