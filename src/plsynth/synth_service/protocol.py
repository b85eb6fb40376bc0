"""The one interface through which trainers ask for synthetic images.

An in-process decoder (`synth_service.local.LocalSynthesizer`) and the Ray synthesis actor's
client both implement it, so SA-CPS and SA-ST do not know which one they talk to.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class SynthesisClient(Protocol):
    backend: str
    """What actually runs the decoder, e.g. ``torch:cpu``, ``ort:CPUExecutionProvider``, ``trt:fp16``."""

    bundle_sha256: str
    """sha256 of the synthesizer bundle's meta.json (which itself lists every file's sha256)."""

    def synthesize(
        self,
        infection: torch.Tensor,
        lung: torch.Tensor,
        images: torch.Tensor | None = None,
        seed: int | None = None,
    ) -> torch.Tensor:
        """Draw CT slices whose infection is where ``infection`` says, inside the given lungs.

        infection: (B, 1, H, W) float {0, 1}, the (pseudo-)label.
        lung: (B, H, W) integer, 0 background, 1 patient-left lung, 2 patient-right lung.
        images: (B, 1, H, W) in [0, 1], the slices the maps belong to: the ``self`` pool mode takes
            their own style, a synthesizer trained with ``synth.vessels`` reads their vessels; callers send them.
        seed: fixes the pool draw and the decoder noise.
        Returns (B, 1, H, W) float32 in [0, 1] at the request's H, W (resized from the decoder's size).
        """
        ...
