"""Process-wide torch settings every entry point that runs networks applies once."""

from __future__ import annotations

import torch


def flush_denormals() -> None:
    """Flush subnormal floats to zero on the CPU.

    Tiny activations and gradients (e.g. SEAN's noise weights, initialised at 0, and its
    instance-normalised features) turn into subnormals, on which x86 convolutions and GEMMs run
    10-50x slower: one SEAN GAN step at the demo preset took 15 s with them and 0.2 s without
    (2-core CPU, bench note in BENCHMARKS.md). Flushing changes results by < 1e-38 per value.
    """
    torch.set_flush_denormal(True)
