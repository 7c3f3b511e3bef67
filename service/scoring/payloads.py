"""Binary payloads to validated batches, whatever carried them: `.npy` arrays and PNG/JPEG images -> images
`(N, *input_shape)` float32 checked against the bundle's input spec (HTTP bodies, multipart files, batch files).

Errors are the inputs' own: `MalformedInputError` (not a .npy / PNG / JPEG, or a header that lies: HTTP 400),
`UnsupportedInputError` (image payloads for a non-image input: 415), `InputError` (a payload that does not fit the
spec: 422, or 413 for too many instances).
"""

from __future__ import annotations

import io
import math
import re
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from oodserve.bundle.manifest import InputSpec
from oodserve.bundle.preprocess import resize_image
from oodserve.scoring.arrays import check_image_array
from oodserve.scoring.inputs import InputError, MalformedInputError, UnsupportedInputError

PNG_ONLY = ("PNG",)
JPEG_ONLY = ("JPEG",)
PNG_OR_JPEG = ("PNG", "JPEG")
NPY_MAGIC = b"\x93NUMPY"
_NPY_HEADER = re.compile(rb"\{'descr': '([<>|=]?[biuf][0-9]+)', 'fortran_order': (True|False), 'shape': \(([0-9, ]*)\), \} *\n")


def checked_images(array: np.ndarray, spec: InputSpec, max_instances: int) -> np.ndarray:
    """check_image_array against the bundle's input spec (InputError when the array does not fit)."""
    return check_image_array(array, spec.shape, spec.dtype, spec.min, spec.max, max_instances)


def fast_npy_header(body: bytes) -> tuple[tuple[int, ...], bool, np.dtype[Any], int] | None:
    """(shape, fortran_order, dtype, data offset) of a format-1.0 header exactly as np.save writes it, or None.

    numpy's own reader evaluates the header with ast.literal_eval, which costs more than scoring a small
    request; other spellings (format 2.0, other writers) still go through it.
    """
    if len(body) < 10 or body[6:8] != b"\x01\x00":
        return None
    header_end = 10 + int.from_bytes(body[8:10], "little")
    match = _NPY_HEADER.fullmatch(body[10:header_end])
    if match is None:
        return None
    descr, fortran_order, shape_text = match.groups()
    shape = tuple(int(part) for part in shape_text.split(b",") if part.strip())
    return shape, fortran_order == b"True", np.dtype(descr.decode("ascii")), header_end


def read_npy(body: bytes) -> np.ndarray:
    """The array of a .npy file (format 1.0 or 2.0, never pickled objects), without copying its data.

    The header is parsed first and the data length must equal shape x itemsize exactly, so a header
    that declares a huge shape is refused (MalformedInputError, 400) before anything is allocated.
    """
    if not body.startswith(NPY_MAGIC):
        raise MalformedInputError(
            "malformed_npy", "body is not a .npy file: it must start with the magic string \\x93NUMPY (np.save output)"
        )
    fast = fast_npy_header(body)
    if fast is not None:
        shape, fortran_order, dtype, offset = fast
        return _npy_array(body, shape, fortran_order, dtype, offset)
    stream = io.BytesIO(body)
    try:
        version = np.lib.format.read_magic(stream)
        if version == (1, 0):
            shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(stream)
        elif version == (2, 0):
            shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(stream)
        else:
            raise MalformedInputError(
                "malformed_npy", f".npy format version {version[0]}.{version[1]} is not supported; use 1.0 or 2.0 (np.save)"
            )
    except InputError:
        raise
    except (ValueError, SyntaxError, TypeError) as error:
        raise MalformedInputError("malformed_npy", f".npy header cannot be read: {error}") from error
    return _npy_array(body, tuple(shape), fortran_order, dtype, stream.tell())


def _npy_array(body: bytes, shape: tuple[int, ...], fortran_order: bool, dtype: np.dtype[Any], offset: int) -> np.ndarray:
    """A zero-copy view of the data after the header, once its length matches the declared shape."""
    if dtype.hasobject:
        raise InputError("invalid_dtype", ".npy arrays of Python objects are not accepted (they need pickle); send integers or floats")
    count = math.prod(shape)
    expected = count * dtype.itemsize
    if len(body) - offset != expected:
        raise MalformedInputError(
            "malformed_npy",
            f".npy header declares shape {list(shape)} of {dtype.str} ({expected} data bytes) but the body carries {len(body) - offset}",
        )
    flat = np.frombuffer(body, dtype=dtype, count=count, offset=offset)
    return flat.reshape(shape, order="F" if fortran_order else "C")


def npy_to_images(body: bytes, spec: InputSpec, max_instances: int) -> np.ndarray:
    """A .npy body of shape (N, *instance shape) -> validated (N, *input_shape) float32."""
    return checked_images(read_npy(body), spec, max_instances)


def image_size(spec: InputSpec) -> tuple[int, int, int]:
    """(height, width, channels) of an image input ([H, W], [1, H, W] or [3, H, W]); UnsupportedInputError for other inputs."""
    shape = list(spec.shape)
    if len(shape) == 2:
        shape = [1, *shape]
    if len(shape) != 3 or shape[0] not in (1, 3):
        raise UnsupportedInputError(
            "unsupported_media_type", f"image bodies need a greyscale or RGB image input; this model's input shape is {spec.shape}"
        )
    return shape[1], shape[2], shape[0]


def png_to_pixels(data: bytes, height: int, width: int, what: str, channels: int = 1, formats: Sequence[str] = PNG_ONLY,
                  resize: tuple[str, float] | None = None) -> np.ndarray:
    """One image file of `formats` (PNG, JPEG) -> uint8 pixels: (height, width) for greyscale inputs (8-bit
    colour converted with ITU-R 601-2 luma, alpha dropped, 16-bit scaled to 8 bits), (height, width, 3) for
    RGB inputs. Wrong size: InputError (checked before decoding), unless `resize` (mode, crop fraction) of the input
    spec brings any size to (height, width) (`oodserve.bundle.preprocess.resize_image`); not one of `formats`:
    MalformedInputError."""
    kind = " or ".join(formats)
    try:
        with Image.open(io.BytesIO(data), formats=list(formats)) as image:
            if image.size != (width, height) and resize is not None:
                pixels = np.asarray(image.convert("RGB" if channels == 3 else "L"), dtype=np.uint8)
                planar = pixels[None] if channels == 1 else np.moveaxis(pixels, -1, 0)
                fitted = resize_image(planar, (height, width), resize[0], resize[1])
                return fitted[0] if channels == 1 else np.moveaxis(fitted, 0, -1)
            if image.size != (width, height):
                raise InputError(
                    "invalid_shape", f"{what} is {image.size[0]}x{image.size[1]} pixels; this model takes {width}x{height} images"
                )
            if image.mode in ("I;16", "I;16B", "I;16L", "I"):
                pixels = np.clip(np.asarray(image, dtype=np.int64) >> 8, 0, 255).astype(np.uint8)
                return np.repeat(pixels[:, :, None], 3, axis=2) if channels == 3 else pixels
            return np.asarray(image.convert("RGB" if channels == 3 else "L"), dtype=np.uint8)
    except InputError:
        raise
    except UnidentifiedImageError as error:
        raise MalformedInputError("malformed_png", f"{what} is not a {kind} image") from error
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        raise MalformedInputError("malformed_png", f"{what} cannot be decoded as {kind}: {error}") from error


def pngs_to_images(
    files: Sequence[tuple[str, bytes]], spec: InputSpec, max_instances: int, formats: Sequence[str] = PNG_ONLY
) -> np.ndarray:
    """(description, PNG bytes) per image -> validated (N, *input_shape) float32, in order."""
    if not files:
        raise InputError("empty_batch", "the body holds no PNG images; send at least one")
    if len(files) > max_instances:
        raise InputError("too_many_instances", f"got {len(files)} images; at most {max_instances} per request")
    height, width, channels = image_size(spec)
    resize = (spec.resize, spec.crop_fraction or 0.875) if spec.resize not in (None, "none") else None
    pixels = np.stack([png_to_pixels(data, height, width, what, channels, formats, resize) for what, data in files])
    if channels == 1:
        pixels = pixels.reshape((len(files), *spec.shape))
    return checked_images(pixels, spec, max_instances)  # RGB arrives channels-last (N, H, W, 3)
