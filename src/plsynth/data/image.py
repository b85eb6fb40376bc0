"""The one in-memory type for a CT input: voxels, spacing, geometry and where it came from."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np


@dataclass(frozen=True)
class CTImage:
    """A CT volume in HU or a 2D slice already windowed to 8 bit.

    ``array`` is float32 with axes ``(z, y, x)`` in LPS order (as ITK, DICOM and lungmask):
    x runs toward the patient's left, y toward posterior, z toward superior, so ``array[z]``
    shows the usual radiological view (patient's right on the image's left, anterior at top).
    A 2D slice has shape ``(1, rows, columns)`` exactly as stored in the file (its orientation
    is unknown and assumed to be the radiological view) and ``spacing`` None.

    ``geometry`` is what the reader needs to write a mask back in the input's exact grid
    (for NIfTI: the original affine, header and the reorientation to undo); only
    ``plsynth.data.io`` looks inside it.
    """

    array: np.ndarray
    kind: Literal["hu", "uint8"]
    spacing: tuple[float, float, float] | None  # (z, y, x) in mm
    source: Path
    geometry: Any = field(repr=False, default=None)

    @property
    def is_slice(self) -> bool:
        return self.kind == "uint8"

    @property
    def voxel_volume_ml(self) -> float | None:
        """Volume of one voxel in ml (None for 2D slices, which have no spacing)."""
        if self.spacing is None:
            return None
        return float(np.prod(self.spacing)) / 1000.0
