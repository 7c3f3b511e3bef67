"""Image data sets from IDX (gzip or not), `.npy` arrays or folders of PNGs, as uint8 arrays (numpy only).

Torch-free, so the serving tools (`oodserve bench`, the GPU check) read the same files the training side does;
`oodserve.models.data` builds its splits and loaders on top of this module."""

from __future__ import annotations

import gzip
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

DEFAULT_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")

FASHION_MNIST_LABELS = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]

_IDX_DTYPES: dict[int, Any] = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


@dataclass(frozen=True)
class ImageSet:
    """Images `(N, H, W)` uint8 and optional integer labels `(N,)`."""

    images: np.ndarray
    labels: np.ndarray | None = None


def read_idx(path: str | Path) -> np.ndarray:
    """Read one IDX file (LeCun's MNIST format), gzip-compressed or not."""
    path = Path(path)
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{path}: not an IDX file (bad magic number)")
    type_code, ndim = raw[2], raw[3]
    if type_code not in _IDX_DTYPES:
        raise ValueError(f"{path}: unknown IDX element type 0x{type_code:02x}")
    shape = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=_IDX_DTYPES[type_code], offset=4 + 4 * ndim)
    expected = int(np.prod(shape))
    if data.size != expected:
        raise ValueError(f"{path}: IDX header says {shape} ({expected} values), file holds {data.size}")
    return data.reshape(shape).astype(np.dtype(_IDX_DTYPES[type_code]).newbyteorder("="))


def _find_idx(directory: Path, split: str, kind: str) -> Path | None:
    prefix = "train" if split == "train" else "t10k"
    for name in (f"{prefix}-{kind}-idx{3 if kind == 'images' else 1}-ubyte",):
        for suffix in (".gz", ""):
            candidate = directory / f"{name}{suffix}"
            if candidate.exists():
                return candidate
    return None


def _as_uint8_images(array: np.ndarray, source: str) -> np.ndarray:
    if array.ndim == 4 and array.shape[1] == 1:
        array = array[:, 0]
    if array.ndim != 3:
        raise ValueError(f"{source}: expected images of shape (N, H, W), got {array.shape}")
    if array.dtype != np.uint8:
        if not np.all(np.isfinite(array)) or array.min() < 0 or array.max() > 255:
            raise ValueError(f"{source}: pixel values must lie in 0..255")
        array = np.rint(array).astype(np.uint8)
    return np.ascontiguousarray(array)


def load_images(path: str | Path, split: str = "test") -> ImageSet:
    """Load a data set from `path`.

    `path` may be a directory holding MNIST-style IDX files (`train-*` / `t10k-*`, gzip or not;
    `split` picks which), a single IDX image file, an `.npy` file of shape (N, H, W) or (N, 1, H, W),
    or a directory of PNG files (read in sorted order, converted to 8-bit greyscale).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no data at {path}")
    if path.is_file():
        if path.suffix == ".npy":
            return ImageSet(_as_uint8_images(np.load(path, allow_pickle=False), str(path)))
        return ImageSet(_as_uint8_images(read_idx(path), str(path)))
    images_file = _find_idx(path, split, "images")
    if images_file is not None:
        labels_file = _find_idx(path, split, "labels")
        labels = read_idx(labels_file).astype(np.int64) if labels_file is not None else None
        return ImageSet(_as_uint8_images(read_idx(images_file), str(images_file)), labels)
    pngs = sorted(p for p in path.iterdir() if p.suffix.lower() == ".png")
    if pngs:
        from PIL import Image

        stack = [np.asarray(Image.open(p).convert("L"), dtype=np.uint8) for p in pngs]
        return ImageSet(_as_uint8_images(np.stack(stack), str(path)))
    raise ValueError(f"{path}: found no IDX files for split {split!r}, no .npy and no PNG images")
