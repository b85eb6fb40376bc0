"""plsynth: pseudo-label guided image synthesis for COVID-19 infection segmentation on chest CT."""

__version__ = "0.1.0"
