"""Small data files for tests: MNIST-style IDX files (gzip or not)."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np


def write_idx(path: Path, array: np.ndarray, compress: bool = False) -> None:
    """Write `array` as an IDX file of unsigned bytes (LeCun's MNIST format), gzip-compressed when `compress`."""
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    raw = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(raw, compresslevel=1) if compress else raw)
