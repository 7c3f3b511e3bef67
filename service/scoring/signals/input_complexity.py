"""Signal kind `input_complexity`: -log2 p(x) - L(x), the likelihood corrected by a lossless compressor's
code length L (Serra et al. 2020, "Input complexity and out-of-distribution detection with
likelihood-based generative models"); L is the PNG length in bits."""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image

from service.scoring.signals.base import ModelOutputs, SignalSource, dimensions_of, register_signal_kind
from service.scoring.signals.bits_per_dim import bits_per_dim_signal


def png_length_bits(images: np.ndarray) -> np.ndarray:
    """L(x) of Serra et al. 2020: 8 * bytes of the lossless PNG of each 8-bit greyscale image.

    images: (N, H, W) or (N, 1, H, W) in raw 0..255 scale (rounded and clipped to uint8).
    Pillow, optimize off, zlib level 6 (Pillow's default). Returns (N,) float64 bits.
    """
    pixels = np.asarray(images, dtype=np.float64)
    if pixels.ndim == 4 and pixels.shape[1] == 1:
        pixels = pixels[:, 0]
    if pixels.ndim != 3:
        raise ValueError(f"PNG length needs (N, H, W) or (N, 1, H, W) images, got shape {list(pixels.shape)}")
    as_bytes = np.clip(np.rint(pixels), 0, 255).astype(np.uint8)
    lengths = np.empty(as_bytes.shape[0], dtype=np.float64)
    for index, image in enumerate(as_bytes):
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="PNG", optimize=False, compress_level=6)
        lengths[index] = 8.0 * buffer.getbuffer().nbytes
    return lengths


def _validate(params: Mapping[str, Any], input_shape: Sequence[int]) -> None:
    shape = list(input_shape)
    if not (len(shape) == 2 or (len(shape) == 3 and shape[0] == 1)):
        raise ValueError(f"input_complexity needs greyscale images of shape [H, W] or [1, H, W], input shape is {shape}")


@register_signal_kind(
    "input_complexity",
    description="-log2 p(x) - L(x), L = PNG length in bits (Serra et al. 2020)",
    validate=_validate,
)
def input_complexity_signal(outputs: ModelOutputs, images: np.ndarray, source: SignalSource, params: Mapping[str, Any]) -> np.ndarray:
    """bpd(x) * D - L(x) in bits, images (N, 1, H, W) or (N, H, W). Returns (N,) float64."""
    bits = bits_per_dim_signal(outputs, images, source, params) * dimensions_of(images)
    return bits - png_length_bits(images)
