"""In-process synthesis: a ``SynthesisClient`` that runs a synthesizer bundle's decoder itself.

Used by SA-CPS / SA-ST when ``synth.backend`` is ``torch`` or ``ort``, by ``plsynth synth
preview`` and by the Ray synthesis actor (through ``decode``, which it batches).

Per request (paper eq. 9-10): the map is built from (lung, infection), and with ``synth.vessels``
the vessels read from the request's images, by ``plsynth.data.semantic`` (``semantic``); one reference style is drawn from the bundle's pool for the whole
request (K codes averaged per class, see ``StylePool.draw``), or, in ``self`` mode, each image
is encoded under its own map; the decoder draws [-1, 1] images that are returned as (x + 1) / 2
in [0, 1], with the real infection's texture laid over the drawn infection where the bundle
carries it (``synth.texture``), black outside the lung field where the synthesizer learned
lung-masked slices, resized to the request's size.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from plsynth.bundles.onnx_export import ort_session
from plsynth.bundles.style_pool import PoolMode
from plsynth.bundles.synthesizer import load_decoder_bundle
from plsynth.torch_setup import flush_denormals

log = logging.getLogger(__name__)


class LocalSynthesizer:
    """Runs a synthesizer bundle in this process.

    backend: ``torch`` (the reference) or ``ort`` (ONNX Runtime on its CPU provider, or the
    providers given); ``trt`` belongs to the engine cache (bundles.tensorrt_engine) and is refused here.
    pool_mode / k default to the bundle's (``synth.pool_mode`` / ``synth.pool_k``).
    seed: seeds the generator used by calls without their own ``seed``, so a sequence of calls
    is reproducible; a call's ``seed`` fixes its pool draw and noise on its own.
    """

    def __init__(
        self,
        bundle: str | Path,
        backend: Literal["torch", "ort", "trt"] = "torch",
        pool_mode: PoolMode | None = None,
        k: int | None = None,
        seed: int = 0,
        device: str = "cpu",
        threads: int = 0,
        providers: list[str] | None = None,
    ) -> None:
        if backend == "trt":
            raise ValueError(
                "backend 'trt' is built by the TensorRT engine cache (plsynth.bundles.tensorrt_engine); "
                "LocalSynthesizer runs 'torch' or 'ort'"
            )
        if backend not in ("torch", "ort"):
            raise ValueError(f"unknown synthesis backend {backend!r}; use torch or ort")
        flush_denormals()
        self.bundle = load_decoder_bundle(bundle, device=device)
        self.bundle_sha256 = self.bundle.sha256
        self.device = torch.device(device)
        self.image_size = self.bundle.config.image_size
        self.num_classes = self.bundle.decoder.num_classes
        self.black_outside = self.bundle.meta.get("data", {}).get("lung_handling") == "mask"
        self.pool_mode: PoolMode = pool_mode or self.bundle.config.pool_mode
        self.k = k or self.bundle.config.pool_k
        if self.pool_mode != "self":
            self.bundle.pool.members(self.pool_mode)  # fail now, not at the first request, if empty
        self.generator = torch.Generator().manual_seed(seed)
        self._session = None
        if backend == "ort":
            self._session = ort_session(self.bundle.onnx_path, threads=threads, providers=providers)
            self._input_names = [i.name for i in self._session.get_inputs()]
            self.backend = f"ort:{self._session.get_providers()[0]}"
        else:
            self.backend = f"torch:{self.device.type}"
        log.info("synthesizer %s (%s, pool %s, k=%d)", self.bundle.path, self.backend, self.pool_mode, self.k)

    # -- lower level: what the Ray actor batches ------------------------------------------

    def decode(self, onehot: torch.Tensor, style: torch.Tensor, noise_seed: int | None = None) -> torch.Tensor:
        """Decoder on (B, C, S, S) one-hot and (B, C, D) styles -> (B, 1, S, S) float32 in [0, 1] (CPU).

        ``noise_seed`` fixes the noise (None: the synthesizer's own generator advances).
        """
        generator = torch.Generator().manual_seed(noise_seed) if noise_seed is not None else self.generator
        return self._decode(onehot, style, generator)

    def _decode(self, onehot: torch.Tensor, style: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        s = self.image_size
        c = self.num_classes
        if tuple(onehot.shape[1:]) != (c, s, s) or tuple(style.shape[:2]) != (onehot.shape[0], c):
            raise ValueError(
                f"decode: expected onehot (B, {c}, {s}, {s}) and style (B, {c}, D), got "
                f"{tuple(onehot.shape)} and {tuple(style.shape)}"
            )
        noise = self.bundle.decoder.make_noise(len(onehot), generator)  # drawn on CPU: same on every device
        if self._session is not None:
            feed = {"onehot": onehot.float().cpu().numpy(), "style": style.float().cpu().numpy()}
            if noise is not None and "noise" in self._input_names:
                feed["noise"] = noise.numpy()
            (image,) = self._session.run(["image"], feed)
            image = torch.from_numpy(np.asarray(image))
        else:
            with torch.inference_mode():
                image = self.bundle.decoder(
                    onehot.float().to(self.device),
                    style.float().to(self.device),
                    None if noise is None else noise.to(self.device),
                ).cpu()
        return self.to_unit(image, onehot, generator)

    def to_unit(self, image: torch.Tensor, onehot: torch.Tensor, generator: torch.Generator | None = None
                ) -> torch.Tensor:
        """The decoder's [-1, 1] output as images in [0, 1]: with ``synth.texture``, the bundle's
        infection texture laid over the map's infection (drawn from ``generator``, default this
        synthesizer's); a synthesizer trained on lung-masked slices (``data.lung_handling: mask``)
        returns them black outside the map's lung field, as every slice its segmenters see (the
        consistency loss's rule)."""
        from plsynth.data.semantic import black_outside_field
        from plsynth.models.texture import add_texture

        image = ((image + 1) / 2).clamp(0, 1).float()
        onehot = onehot.float().to(image.device)
        image = add_texture(image, onehot, self.bundle.texture, self.bundle.config.texture, generator or self.generator)
        return black_outside_field(image, onehot) if self.black_outside else image

    def reference_style(self, batch: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """One reference style (B, C, D) drawn from the pool (not for ``self`` mode)."""
        return self.bundle.pool.draw(batch, self.k, generator or self.generator, mode=self.pool_mode)

    @torch.inference_mode()
    def encode(self, images: torch.Tensor, onehot: torch.Tensor) -> torch.Tensor:
        """The images' own styles (B, C, D) under their maps; images (B, 1, S, S) in [0, 1]."""
        return self.bundle.encoder(images.float().to(self.device) * 2 - 1, onehot.float().to(self.device)).cpu()

    # -- the request's map and style: what the Ray actor and ``synthesize`` share -------------

    def semantic(self, infection: torch.Tensor, lung: torch.Tensor, images: torch.Tensor | None = None) -> torch.Tensor:
        """The class map (B, S, S) a request is drawn from, at the decoder's size S.

        infection (B, 1, H, W) (> 0.5 = infection) and lung (B, H, W); a synthesizer trained with
        vessels (``synth.vessels``) reads them from the request's images (B, 1, H, W) in [0, 1],
        which it then needs. The rule is the training batches' (``class_map_at``).
        """
        return self._request(infection, lung, images)[1]

    def condition(self, infection: torch.Tensor, lung: torch.Tensor, images: torch.Tensor | None = None,
                  generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(one-hot (B, C, S, S), style (B, C, D)) of a request (paper eq. 9-10): one pool draw
        for the whole request from ``generator`` (None: this synthesizer's own), or in ``self``
        mode the images' own styles."""
        from plsynth.data.semantic import one_hot

        images, semantic = self._request(infection, lung, images)
        onehot = one_hot(semantic, self.num_classes)
        if self.pool_mode == "self":
            if images is None:
                raise ValueError("pool mode 'self' needs the request's images")
            return onehot, self.encode(images, onehot)
        return onehot, self.reference_style(onehot.shape[0], generator)

    def _request(self, infection: torch.Tensor, lung: torch.Tensor,
                 images: torch.Tensor | None) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(images at size S or None, class map (B, S, S)) of a request, shapes checked."""
        from plsynth.data.semantic import class_map_at

        if infection.ndim != 4 or infection.shape[1] != 1 or lung.ndim != 3:
            raise ValueError(
                f"synthesize: infection (B, 1, H, W) and lung (B, H, W) expected, got "
                f"{tuple(infection.shape)} and {tuple(lung.shape)}"
            )
        if infection.shape[0] != lung.shape[0] or infection.shape[2:] != lung.shape[1:]:
            raise ValueError(f"synthesize: infection {tuple(infection.shape)} and lung {tuple(lung.shape)} differ")
        images = None if images is None else images.detach().cpu()
        return class_map_at(self.image_size, lung.detach().cpu(), infection.detach().cpu(), images,
                            self.bundle.config.vessels)

    # -- SynthesisClient ------------------------------------------------------------------

    def synthesize(
        self,
        infection: torch.Tensor,
        lung: torch.Tensor,
        images: torch.Tensor | None = None,
        seed: int | None = None,
    ) -> torch.Tensor:
        out_device = infection.device
        h, w = infection.shape[-2:]
        generator = torch.Generator().manual_seed(seed) if seed is not None else self.generator
        onehot, style = self.condition(infection, lung, images, generator)  # the draw, then the noise
        result = self._decode(onehot, style, generator)
        if (h, w) != (self.image_size, self.image_size):
            result = F.interpolate(result, size=(h, w), mode="bilinear", align_corners=False).clamp(0, 1)
        return result.to(out_device)
