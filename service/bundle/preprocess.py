"""Declared preprocessing of a backbone bundle: how raw 8-bit images become the user's model input.

A backbone bundle serves the user's own classifier (design.md section 10). The bundle's input is always raw
images `(C, H, W)` in 0..255 (what clients send: PNG/JPEG, .npy, JSON, v2 UINT8/FP32 tensors); the manifest
declares how they become the model's input tensor, and the fitted graph applies the same steps inside ONNX:

    y = (x * scale - mean[c]) / std[c]        per channel c, in the image's RGB order
    then the model's layout (NCHW or NHWC) and dtype (float32, or uint8 rounded and clipped)

Images of another size are brought to the model's `size` before that, on the host (Pillow), when `resize`
is declared: `resize` scales to the size, `center_crop` scales the shorter side to size / crop_fraction and
cuts the centre. `apply_preprocess` is the numpy reference of the in-graph steps (parity-tested).
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator


class PreprocessSpec(BaseModel):
    """What a team declares about its model's input (the manifest's `backbone.preprocess`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    input_name: str = Field(min_length=1)
    layout: Literal["NCHW", "NHWC"] = "NCHW"
    dtype: Literal["float32", "uint8"] = "float32"
    channels: int = Field(3, ge=1, le=4)
    size: tuple[int, int]
    """(H, W) the model takes."""
    resize: Literal["none", "resize", "center_crop"] = "none"
    crop_fraction: float = Field(0.875, gt=0.0, le=1.0)
    scale: float = 1.0 / 255.0
    mean: list[float] | None = None
    std: list[float] | None = None

    @model_validator(mode="after")
    def _consistent(self) -> PreprocessSpec:
        if any(side <= 0 for side in self.size):
            raise ValueError(f"size must be positive (H, W), got {list(self.size)}")
        if not (math.isfinite(self.scale) and self.scale > 0):
            raise ValueError(f"scale must be a positive number, got {self.scale}")
        for name, values in (("mean", self.mean), ("std", self.std)):
            if values is not None and len(values) not in (1, self.channels):
                raise ValueError(f"{name} needs 1 or {self.channels} values (one per channel), got {len(values)}")
            if values is not None and not all(math.isfinite(v) for v in values):
                raise ValueError(f"{name} values must be finite, got {values}")
        if self.std is not None and any(v <= 0 for v in self.std):
            raise ValueError(f"std values must be > 0, got {self.std}")
        if self.dtype == "uint8" and (self.mean is not None or self.std is not None or self.scale != 1.0):
            raise ValueError("a uint8 model input takes the raw pixels: leave scale at 1 and mean/std unset")
        return self

    def channel_mean(self) -> np.ndarray:
        """(C,) float32 mean per channel (0 when not declared)."""
        values = self.mean if self.mean is not None else [0.0]
        return np.broadcast_to(np.asarray(values, dtype=np.float32), (self.channels,)).copy()

    def channel_std(self) -> np.ndarray:
        """(C,) float32 std per channel (1 when not declared)."""
        values = self.std if self.std is not None else [1.0]
        return np.broadcast_to(np.asarray(values, dtype=np.float32), (self.channels,)).copy()

    def model_input_shape(self) -> list[int]:
        """Per-instance shape of the model's input in its layout."""
        height, width = self.size
        return [self.channels, height, width] if self.layout == "NCHW" else [height, width, self.channels]


class BackboneSpec(BaseModel):
    """The user's model inside a backbone bundle: where it came from and which tensors the heads read."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    source_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    """sha256 of the user's ONNX file as given (the bundle composes it into one graph with the heads)."""
    source_name: str
    features: str
    """The feature tensor of the user's graph (after pooling, when `pooling` is set)."""
    pooling: Literal["none", "mean", "flatten"] = "none"
    logits: str
    feature_dimension: int = Field(ge=1)
    classes: int = Field(ge=2)
    preprocess: PreprocessSpec


def apply_preprocess(images: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """images (N, C, H, W) raw 0..255 (any real dtype) at the model's size -> the model's input (N, *model_input_shape)."""
    pixels = np.asarray(images, dtype=np.float32)
    if pixels.ndim != 4 or pixels.shape[1] != spec.channels or tuple(pixels.shape[2:]) != tuple(spec.size):
        raise ValueError(f"expected images (N, {spec.channels}, {spec.size[0]}, {spec.size[1]}), got {list(pixels.shape)}")
    if spec.dtype == "uint8":
        values = np.clip(np.rint(pixels), 0, 255).astype(np.uint8)
    else:
        mean = spec.channel_mean().reshape(1, -1, 1, 1)
        std = spec.channel_std().reshape(1, -1, 1, 1)
        values = ((pixels * np.float32(spec.scale) - mean) / std).astype(np.float32)
    return np.ascontiguousarray(values.transpose(0, 2, 3, 1)) if spec.layout == "NHWC" else values


def fit_to_size(image: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """One image (C, H, W) uint8 of any size -> (C, *spec.size) by the declared resize (Pillow, bilinear).

    ValueError when the size differs and no resize is declared."""
    return resize_image(image, spec.size, spec.resize, spec.crop_fraction)


def resize_image(image: np.ndarray, size: tuple[int, int], mode: str, crop_fraction: float = 0.875) -> np.ndarray:
    """One image (C, H, W) uint8 -> (C, *size): `resize` scales to the size; `center_crop` scales the shorter side to
    max(size) / crop_fraction and cuts the centre; `none` accepts the size only. Pillow, bilinear."""
    from PIL import Image

    height, width = size
    if tuple(image.shape[1:]) == (height, width):
        return image
    if mode == "none":
        raise ValueError(f"image is {image.shape[1]}x{image.shape[2]} pixels, the model takes {height}x{width} and the bundle "
                         "declares no resize")
    channels = image.shape[0]
    picture = Image.fromarray(np.ascontiguousarray(image[0] if channels == 1 else np.moveaxis(image, 0, -1)).astype(np.uint8))
    if mode == "resize":
        picture = picture.resize((width, height), Image.Resampling.BILINEAR)
    else:
        shorter = min(picture.size)
        target = max(height, width) / crop_fraction
        factor = target / shorter
        scaled = (max(width, round(picture.size[0] * factor)), max(height, round(picture.size[1] * factor)))
        picture = picture.resize(scaled, Image.Resampling.BILINEAR)
        left, top = (scaled[0] - width) // 2, (scaled[1] - height) // 2
        picture = picture.crop((left, top, left + width, top + height))
    array = np.asarray(picture)
    return array[None] if array.ndim == 2 else np.moveaxis(array, -1, 0)
