"""Process-wide torch settings every entry point that runs networks applies once."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

_flushing = False


def flush_denormals() -> None:
    """Flush subnormal floats to zero on the CPU.

    Tiny activations and gradients (e.g. SEAN's noise weights, initialised at 0, and its
    instance-normalised features) turn into subnormals, on which x86 convolutions and GEMMs run
    10-50x slower: one SEAN GAN step at the demo preset took 15 s with them and 0.2 s without
    (2-core CPU). Flushing changes results by < 1e-38 per value.

    The setting belongs to the calling thread, and threads inherit it when they are created:
    call this before the first parallel torch op of the process creates its thread pool (every
    training command does; in plsynth-infer the torch engine and lungmask do, and ONNX Runtime
    sets the same for its own threads), or the pool's workers keep computing with subnormals.
    """
    global _flushing
    torch.set_flush_denormal(True)
    _flushing = True


@contextmanager
def denormals_kept() -> Iterator[None]:
    """Keep subnormals inside the block (then flush again if we were flushing).

    scipy's KD-tree, which MONAI's surface distances use, crashed the process (segmentation
    fault) when it ran after `flush_denormals` in the same process; metrics run in here.
    """
    was_flushing = _flushing
    if was_flushing:
        torch.set_flush_denormal(False)
    try:
        yield
    finally:
        if was_flushing:
            torch.set_flush_denormal(True)
