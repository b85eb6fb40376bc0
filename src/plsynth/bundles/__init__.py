"""Every on-disk format handed from one stage to the next, read and written in one place.

- ``segmenter``: the model bundle (training -> ``plsynth eval``, ``plsynth-infer``, the container);
- ``synthesizer`` and ``style_pool``: the synthesizer bundle (synthesizer training -> SA-CPS,
  SA-ST, the synthesis actor);
- ``onnx_export``: PyTorch -> ONNX and the parity checks that gate both bundles;
- ``tensorrt_engine``: the engine cache built from a bundle's ONNX on the target machine;
- ``files``: the version record both bundles carry (their files are hashed with ``plsynth.hashing``).

Training writes through this package; deploy and synth_service only read through it. Folders
are committed with ``plsynth.atomic.atomic_folder``, so a bundle is complete or absent.
"""
