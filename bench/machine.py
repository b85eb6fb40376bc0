"""The one line every benchmark writes about the machine it ran on.

Float results (training curves, kernel timings) differ between CPUs of the same core count: the
CPU model and its vector extensions belong next to every figure, which ``platform.processor()``
(``x86_64`` on Linux) does not give.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

VECTOR_FLAGS = ("avx2", "avx512f", "avx512_vnni", "amx_tile")  # what decides fp32 / INT8 kernel speed


def cpu() -> str:
    """CPU model, logical CPUs and the vector extensions that matter here, e.g.
    ``Intel(R) Xeon(R) Processor @ 2.80GHz, 2 CPUs, avx2 avx512f avx512_vnni``."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
                break
    except OSError:
        pass
    vector = " ".join(f for f in VECTOR_FLAGS if f in flags)
    return f"{model}, {os.cpu_count()} CPUs" + (f", {vector}" if vector else "")


def describe() -> str:
    """:func:`cpu` plus Python, torch and the GPU when there is one."""
    text = f"{cpu()}; Python {platform.python_version()}"
    try:
        import torch
    except ImportError:
        return text
    text += f", torch {torch.__version__}"
    if torch.cuda.is_available():
        text += f", GPU {torch.cuda.get_device_name(0)}"
    return text
