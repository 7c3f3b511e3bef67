"""Signal kind `input_complexity`: -log2 p(x) - L(x), the likelihood corrected by a lossless compressor's
code length L (Serra et al. 2020, "Input complexity and out-of-distribution detection with
likelihood-based generative models"); L is the PNG length in bits."""

from __future__ import annotations

import io
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import PIL
from PIL import Image

from oodserve.scoring.signals.base import (
    NO_ARRAYS,
    PARAMETERS_FILE_KEY,
    FittedSignal,
    ModelOutputs,
    SignalSource,
    dimensions_of,
    register_signal_kind,
)
from oodserve.scoring.signals.bits_per_dim import bits_per_dim_signal


def png_length_bits(images: np.ndarray) -> np.ndarray:
    """L(x) of Serra et al. 2020: 8 * bytes of the lossless PNG of each 8-bit image, greyscale or RGB.

    images: (N, H, W), (N, 1, H, W) or (N, 3, H, W) in raw 0..255 scale (rounded and clipped to uint8).
    Pillow, optimize off, zlib level 6 (Pillow's default); RGB images are coded as RGB PNGs (mode "RGB").
    Returns (N,) float64 bits.
    """
    pixels = np.asarray(images, dtype=np.float64)
    if pixels.ndim == 4 and pixels.shape[1] == 1:
        pixels = pixels[:, 0]
    elif pixels.ndim == 4 and pixels.shape[1] == 3:
        pixels = np.moveaxis(pixels, 1, -1)
    if pixels.ndim not in (3, 4):
        raise ValueError(f"PNG length needs (N, H, W), (N, 1, H, W) or (N, 3, H, W) images, got shape {list(pixels.shape)}")
    as_bytes = np.clip(np.rint(pixels), 0, 255).astype(np.uint8)
    lengths = np.empty(as_bytes.shape[0], dtype=np.float64)
    for index, image in enumerate(as_bytes):
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="PNG", optimize=False, compress_level=6)
        lengths[index] = 8.0 * buffer.getbuffer().nbytes
    return lengths


def _validate(params: Mapping[str, Any], input_shape: Sequence[int]) -> None:
    shape = list(input_shape)
    if not (len(shape) == 2 or (len(shape) == 3 and shape[0] in (1, 3))):
        raise ValueError(f"input_complexity needs greyscale or RGB images of shape [H, W], [1, H, W] or [3, H, W], input shape is {shape}")


REFERENCE_IMAGES = 8
CODEC_FILE = "input_complexity_codec.npz"


def codec_name() -> str:
    """The compressor that defines L(x) here: Pillow's PNG writer on the zlib it was built with."""
    return f"PNG, Pillow {PIL.__version__}, zlib {zlib.ZLIB_RUNTIME_VERSION}, level 6"


def fit_input_complexity(
    outputs: ModelOutputs, images: np.ndarray, source: SignalSource, options: Mapping[str, Any], labels: np.ndarray | None
) -> FittedSignal:
    """Nothing to learn; records the compressor that defines L(x) and, in a parameters file, the PNG lengths of
    a few reference images, so that a machine whose encoder codes them differently is found when the bundle loads."""
    reference = np.clip(np.rint(np.asarray(images[:REFERENCE_IMAGES], dtype=np.float64)), 0, 255).astype(np.uint8)
    return FittedSignal(
        {**options, "codec": codec_name(), PARAMETERS_FILE_KEY: options.get(PARAMETERS_FILE_KEY, CODEC_FILE)},
        {"reference_images": reference, "reference_png_bits": png_length_bits(reference)},
    )


def check_codec(params: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> str | None:
    """None when this machine's PNG encoder gives the bundle's reference images (`arrays` of the parameters file) the
    recorded lengths, else what differs."""
    if not arrays or "reference_images" not in arrays or "reference_png_bits" not in arrays:
        return None  # bundles fitted before the reference images were recorded
    here = png_length_bits(arrays["reference_images"])
    if np.array_equal(here, arrays["reference_png_bits"]):
        return None
    return (
        f"the PNG encoder here ({codec_name()}) codes the bundle's reference images in {here.astype(int).tolist()} bits, the fit "
        f"recorded {np.asarray(arrays['reference_png_bits']).astype(int).tolist()} ({params.get('codec', 'codec not recorded')}): "
        "input_complexity values and their p-values would be shifted"
    )


@register_signal_kind(
    "input_complexity",
    description="-log2 p(x) - L(x), L = PNG length in bits (Serra et al. 2020)",
    fit=fit_input_complexity,
    validate=_validate,
    check_environment=check_codec,
    prepare=lambda images, params: png_length_bits(images),
)
def input_complexity_signal(
    outputs: ModelOutputs,
    images: np.ndarray,
    source: SignalSource,
    params: Mapping[str, Any],
    *,
    arrays: Mapping[str, np.ndarray] = NO_ARRAYS,
    prepared: np.ndarray | None = None,
) -> np.ndarray:
    """bpd(x) * D - L(x) in bits, images (N, C, H, W) or (N, H, W); L(x) from `prepared` when the
    batcher computed it beside the models. Returns (N,) float64."""
    bits = bits_per_dim_signal(outputs, images, source, params) * dimensions_of(images)
    return bits - (png_length_bits(images) if prepared is None else prepared)
