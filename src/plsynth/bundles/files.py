"""What every bundle records about its files: the versions that made them, as plain JSON."""

from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Any


def versions() -> dict[str, str]:
    """Versions of everything that shapes a bundle's numbers (recorded in meta.json and reports)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in ("plsynth", "torch", "onnx", "onnxruntime", "openvino", "numpy"):
        dists = ("onnxruntime", "onnxruntime-gpu") if name == "onnxruntime" else (name,)
        out[name] = "absent"  # a missing optional package is recorded, not fatal
        for dist in dists:
            try:
                out[name] = version(dist)
                break
            except PackageNotFoundError:
                continue
    return out


def jsonable(value: Any) -> Any:
    """``value`` as plain JSON data (numpy / torch scalars become numbers, anything else a string)."""
    return json.loads(json.dumps(value, default=lambda o: o.item() if hasattr(o, "item") else str(o)))
