"""Generation from the bundle's flow: standard-normal latents scaled by a temperature through the
exported sampling graph (z -> x), returned as uint8 images or a PNG grid."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from oodserve.bundle.loader import VerifiedBundle
from oodserve.bundle.manifest import ModelSpec
from oodserve.runtime.providers import available_providers, resolve_providers
from oodserve.runtime.sessions import ModelSession, RuntimeOptions, create_model_session


class Sampler:
    """The flow's sampling session; `sample` is thread-safe (onnxruntime sessions are)."""

    def __init__(self, model: ModelSession, latent_shape: list[int], image_shape: list[int]) -> None:
        self.model = model
        self.latent_shape = list(latent_shape)
        self.image_shape = list(image_shape)

    @classmethod
    def for_bundle(cls, bundle: VerifiedBundle, options: RuntimeOptions) -> Sampler | None:
        """The bundle's sampler, or None when the manifest declares none."""
        spec = bundle.manifest.sampler
        if spec is None or bundle.sampler_bytes is None:
            return None
        providers = resolve_providers(options.providers, available_providers(), options.require_gpu)
        model = create_model_session(
            "sampler", ModelSpec(file=spec.file, inputs=[spec.input], outputs=[spec.output]),
            bundle.sampler_bytes, spec.latent_shape, providers, options,
        )
        return cls(model, spec.latent_shape, bundle.manifest.input.shape)

    def sample(self, count: int, temperature: float, seed: int | None = None) -> np.ndarray:
        """`count` images (count, *image_shape) uint8 from z ~ N(0, temperature^2 I)."""
        latents = np.random.default_rng(seed).standard_normal((count, *self.latent_shape)).astype(np.float32) * temperature
        (pixels,) = self.model.session.run([self.model.output_names[0]], {self.model.input_name: latents})
        pixels = np.asarray(pixels, dtype=np.float64).reshape(count, *self.image_shape)
        return np.clip(np.rint(np.nan_to_num(pixels, nan=0.0)), 0, 255).astype(np.uint8)


def png_grid(images: np.ndarray, columns: int | None = None, padding: int = 2) -> bytes:
    """A PNG of images (N, H, W), (N, 1, H, W) greyscale or (N, 3, H, W) RGB tiled in a grid with `padding` pixel gaps."""
    if images.ndim == 4:
        tiles = images[:, 0] if images.shape[1] == 1 else np.moveaxis(images, 1, -1)
    else:
        tiles = images
    count, height, width = tiles.shape[:3]
    columns = columns or int(np.ceil(np.sqrt(count)))
    rows = int(np.ceil(count / columns))
    canvas_shape = (rows * (height + padding) + padding, columns * (width + padding) + padding, *tiles.shape[3:])
    canvas = np.zeros(canvas_shape, dtype=np.uint8)
    for index, tile in enumerate(tiles):
        top = padding + (index // columns) * (height + padding)
        left = padding + (index % columns) * (width + padding)
        canvas[top : top + height, left : left + width] = tile
    buffer = io.BytesIO()
    Image.fromarray(canvas).save(buffer, format="PNG")
    return buffer.getvalue()
