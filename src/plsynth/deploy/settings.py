"""Defaults and choices of the inference knobs, defined once for `Predictor` and ``plsynth-infer``.

Kept apart from the predictor so that the CLI can show them in ``--help`` without importing it.
"""

from __future__ import annotations

BATCH_SIZE = 8  # slices per engine call
LUNG_BACKENDS = ("bundle", "auto", "lungmask", "classical")
LUNG_BACKEND = "bundle"  # the back-end the model was trained with
MIN_SIZE_MM3 = 10.0  # infection components smaller than this are dropped (volumes)
MIN_SIZE_PX = 10  # the same for 2D slices, in pixels
REVIEW_BELOW = 0.8  # two-network Dice below this marks a case for review
AGREEMENT_EVERY = 4  # the second network (agreement flag only) runs on every 4th slice holding lung
OUTPUT_FORMATS = ("nifti", "dicom-seg", "both")
