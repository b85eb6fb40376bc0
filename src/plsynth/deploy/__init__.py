"""From a bundle to masks: export (ONNX, TensorRT), engines, and the plsynth-infer CLI."""
