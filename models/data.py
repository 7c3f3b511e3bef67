"""Data sets for training and fitting: image and vector loaders (numpy only); the plain image readers live in
`oodserve.datasets` (torch-free) and are re-exported here, the splits in `oodserve.models.splits`."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from oodserve.datasets import (  # noqa: F401  (re-exported: the loaders' public names)
    DEFAULT_FASHION_MNIST_DIR,
    FASHION_MNIST_LABELS,
    ImageSet,
    _as_uint8_images,
    _find_idx,
    load_images,
    read_idx,
)

# ---------------------------------------------------------------------------------------------- vectors

logger = logging.getLogger("oodserve.fit")

MIN_EXAMPLES = 200
MIN_VECTOR_ROWS = 30
"""Vector sets below 1,000 rows are calibrated cross-conformally (`oodserve.models.fit.cross_conformal`), down to this."""
MIN_PER_CLASS = 5
MAX_FEATURES = 4096
VECTOR_SUFFIXES = (".csv", ".parquet", ".pq")


class DataError(ValueError):
    """A data file `oodserve fit` cannot use; the message names the file and what is wrong with it."""


@dataclass(frozen=True)
class VectorSet:
    """Feature vectors `(N, D)` float64 with their column names, optional labels `(N,)` int64 (indices into
    `class_names`), and where they came from."""

    features: np.ndarray
    feature_names: list[str]
    labels: np.ndarray | None
    class_names: list[str] | None
    source: str


def _encode_labels(values: np.ndarray, source: str, what: str) -> tuple[np.ndarray, list[str]]:
    """Labels of any type -> (indices (N,) int64, class names sorted as text)."""
    if values.dtype.kind == "f":
        if not np.all(np.isfinite(values)):
            rows = np.flatnonzero(~np.isfinite(values))[:5].tolist()
            raise DataError(f"{source}: {what} has missing or non-finite labels in rows {rows}")
        if np.all(values == np.round(values)):
            values = values.astype(np.int64)
    if values.dtype.kind in "iu":
        names, indices = np.unique(values, return_inverse=True)
        return indices.astype(np.int64), [str(int(name)) for name in names]
    as_text = np.asarray([str(value) for value in values])
    names, indices = np.unique(as_text, return_inverse=True)
    return indices.astype(np.int64), [str(name) for name in names]


def _read_table(path: Path) -> tuple[list[str], list[np.ndarray]]:
    """Column names and numpy columns of a CSV or Parquet file (pyarrow), errors naming the file."""
    import pyarrow as pa

    try:
        if path.suffix.lower() == ".csv":
            from pyarrow import csv

            table = csv.read_csv(path)
        else:
            from pyarrow import parquet

            table = parquet.read_table(path)
    except (pa.ArrowException, OSError) as error:
        raise DataError(f"{path}: cannot be read as {'CSV' if path.suffix.lower() == '.csv' else 'Parquet'}: {error}") from error
    columns = []
    for column in table.columns:
        if pa.types.is_integer(column.type) or pa.types.is_floating(column.type) or pa.types.is_boolean(column.type):
            columns.append(column.to_numpy(zero_copy_only=False).astype(np.float64))
        elif column.null_count == len(column) and len(column):
            columns.append(np.full(len(column), np.nan))
        else:
            columns.append(np.asarray(column.to_pylist(), dtype=object))
    return [str(name) for name in table.column_names], columns


def load_vectors(path: str | Path, label_column: str | None = None, labels: str = "auto") -> VectorSet:
    """Feature vectors from `.npy` (N, D), `.npz` (arrays `x` and optional `y`), CSV or Parquet (numeric
    columns; `label_column` names the label column). `labels`: "auto" (use labels where present) or "none".

    Refuses, naming the file: other shapes, non-numeric feature columns (by name), NaN/Inf cells (rows and
    columns), fewer than 30 rows, more than 4096 features. Labels with a class of fewer than 5 examples (or one
    class only) are set aside with a warning: the fit goes on label-free.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file")
    if labels not in ("auto", "none"):
        raise DataError(f"labels must be 'auto' or 'none', got {labels!r}")
    suffix = path.suffix.lower()
    raw_labels: np.ndarray | None = None
    if suffix in (".npy", ".npz"):
        if label_column is not None:
            raise DataError(f"{path}: --label-column applies to CSV and Parquet files; an .npz holds labels in array `y`")
        try:
            loaded = np.load(path, allow_pickle=False)
        except (ValueError, OSError) as error:
            raise DataError(f"{path}: not a readable {suffix} file without pickled objects: {error}") from error
        if suffix == ".npz":
            with loaded as archive:
                if "x" not in archive.files:
                    raise DataError(f"{path}: an .npz needs an array named `x` (and optionally `y`), it holds {archive.files}")
                features = archive["x"]
                raw_labels = archive["y"] if "y" in archive.files else None
        else:
            features = loaded
        if features.ndim != 2:
            raise DataError(f"{path}: vectors must be a 2-D array (N, D), got shape {list(features.shape)}")
        if features.dtype.kind not in "biuf":
            raise DataError(f"{path}: vectors must be numbers, got dtype {features.dtype}")
        names = [f"x{index}" for index in range(features.shape[1])]
        features = features.astype(np.float64)
    elif suffix in VECTOR_SUFFIXES:
        column_names, columns = _read_table(path)
        if label_column is not None and label_column not in column_names:
            raise DataError(f"{path}: no column named {label_column!r} for the labels; columns are {column_names}")
        if label_column is not None:
            raw_labels = columns[column_names.index(label_column)]
        kept = [(name, column) for name, column in zip(column_names, columns) if name != label_column]
        text = [name for name, column in kept if column.dtype == object]
        if text:
            hint = "" if label_column else "; name the label column with --label-column"
            raise DataError(f"{path}: columns {text} are not numeric{hint}")
        if not kept:
            raise DataError(f"{path}: no feature columns")
        names = [name for name, _ in kept]
        features = np.stack([column for _, column in kept], axis=1)
    else:
        raise DataError(f"{path}: vectors are read from .npy, .npz, .csv or .parquet files, not {suffix or 'a file without suffix'}")
    count, dimensions = features.shape
    bad = ~np.isfinite(features)
    if bad.any():
        rows = np.flatnonzero(bad.any(axis=1))
        columns_bad = [names[index] for index in np.flatnonzero(bad.any(axis=0))]
        raise DataError(
            f"{path}: {int(bad.sum())} missing or non-finite cells (NaN/Inf) in {rows.size} rows "
            f"(first rows {rows[:5].tolist()}), columns {columns_bad[:10]}; fill or drop them first"
        )
    if count < MIN_VECTOR_ROWS:
        raise DataError(f"{path}: {count} rows; oodserve fit needs at least {MIN_VECTOR_ROWS} vectors to train and calibrate")
    if not 1 <= dimensions <= MAX_FEATURES:
        raise DataError(f"{path}: {dimensions} features; oodserve fit takes 1 to {MAX_FEATURES}")
    indices = class_names = None
    if raw_labels is not None and labels == "auto":
        if len(raw_labels) != count:
            raise DataError(f"{path}: {len(raw_labels)} labels for {count} rows")
        indices, class_names = _encode_labels(np.asarray(raw_labels), str(path), "the label column" if label_column else "`y`")
        try:
            check_class_sizes(indices, class_names, str(path))
        except DataError as error:
            logger.warning("%s; fitting without labels", error)
            indices = class_names = None
    return VectorSet(features, names, indices, class_names, str(path))


def check_class_sizes(labels: np.ndarray, class_names: list[str], source: str) -> None:
    """DataError when a class has fewer than MIN_PER_CLASS examples or there is only one class."""
    counts = np.bincount(labels, minlength=len(class_names))
    small = [f"{class_names[index]!r} ({int(counts[index])})" for index in np.flatnonzero(counts < MIN_PER_CLASS)]
    if small:
        raise DataError(
            f"{source}: classes {small} have fewer than {MIN_PER_CLASS} examples; merge or drop them, or fit with --labels none"
        )
    if len(class_names) < 2:
        raise DataError(f"{source}: one class only ({class_names[0]!r}); fit with --labels none for a label-free detector")


def is_vector_file(path: str | Path) -> bool:
    """True for CSV / Parquet, and for .npy / .npz whose features array is 2-D float (images are 3-D or 4-D)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in VECTOR_SUFFIXES:
        return True
    if suffix not in (".npy", ".npz") or not path.is_file():
        return False
    try:
        if suffix == ".npy":
            array = np.load(path, mmap_mode="r", allow_pickle=False)
            return array.ndim == 2
        with np.load(path, allow_pickle=False) as archive:
            return "x" in archive.files and archive["x"].ndim == 2
    except (ValueError, OSError):
        return False


# ---------------------------------------------------------------------------------------------- images of any size

IMAGE_FILE_SUFFIXES = (".png", ".jpg", ".jpeg")
MIN_SIDE, MAX_SIDE = 8, 64


@dataclass(frozen=True)
class ImageDataset:
    """Images `(N, C, H, W)` uint8 (C = 1 greyscale or 3 RGB), optional labels `(N,)` int64 indexing
    `class_names`, and where they came from."""

    images: np.ndarray
    labels: np.ndarray | None
    class_names: list[str] | None
    source: str


def parse_resize(text: str | None) -> tuple[int, int] | None:
    """`--resize HxW` -> (H, W); None stays None."""
    if text is None:
        return None
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(part.isdigit() and int(part) > 0 for part in parts):
        raise DataError(f"--resize takes HxW in pixels, for example 32x32; got {text!r}")
    return int(parts[0]), int(parts[1])


def _as_nchw(array: np.ndarray, source: str) -> np.ndarray:
    """(N, H, W), (N, H, W, C) or (N, C, H, W) with C in {1, 3}, uint8 or integers in 0..255 -> (N, C, H, W) uint8."""
    if array.ndim == 3:
        array = array[:, None]
    elif array.ndim == 4 and array.shape[-1] in (1, 3) and array.shape[1] not in (1, 3):
        array = np.moveaxis(array, -1, 1)
    elif not (array.ndim == 4 and array.shape[1] in (1, 3)):
        raise DataError(f"{source}: images must be (N, H, W), (N, H, W, C) or (N, C, H, W) with 1 or 3 channels, got {list(array.shape)}")
    if array.dtype != np.uint8:
        if array.dtype.kind not in "iuf" or not np.all(np.isfinite(array)) or array.min() < 0 or array.max() > 255:
            raise DataError(f"{source}: pixels must be uint8 (or numbers in 0..255), got {array.dtype}")
        if array.dtype.kind == "f" and not np.all(array == np.round(array)):
            raise DataError(f"{source}: pixels must be whole numbers in 0..255 (8-bit images), got fractional values")
        array = array.astype(np.uint8)
    return np.ascontiguousarray(array)


def _resized(images: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(N, C, H, W) uint8 resized to (N, C, *size) with Pillow's bilinear filter."""
    from PIL import Image

    height, width = size
    channels = images.shape[1]
    out = np.empty((len(images), channels, height, width), dtype=np.uint8)
    for index, image in enumerate(images):
        picture = Image.fromarray(image[0] if channels == 1 else np.moveaxis(image, 0, -1))
        resized = np.asarray(picture.resize((width, height), Image.Resampling.BILINEAR))
        out[index] = resized[None] if channels == 1 else np.moveaxis(resized, -1, 0)
    return out


def _is_colour(picture: Any) -> bool:
    """True when a Pillow image has pixels whose red, green and blue differ (grey RGB files are greyscale)."""
    if picture.mode in ("1", "L", "LA", "I", "I;16", "F"):
        return False
    rgb = np.asarray(picture.convert("RGB"))
    return bool(np.any(rgb[..., 0] != rgb[..., 1]) or np.any(rgb[..., 1] != rgb[..., 2]))


def _read_image_files(paths: list[Path], source: str) -> np.ndarray:
    """Image files -> (N, C, H, W) uint8; RGB for all when any is in colour; one size for all (else an error)."""
    from PIL import Image, UnidentifiedImageError

    pictures = []
    for path in paths:
        try:
            with Image.open(path) as image:
                image.load()
                pictures.append(image.copy())
        except (UnidentifiedImageError, OSError) as error:
            raise DataError(f"{path}: not a readable PNG or JPEG image: {error}") from error
    colour = any(_is_colour(picture) for picture in pictures)
    sizes: dict[tuple[int, int], Path] = {}
    for path, picture in zip(paths, pictures):
        sizes.setdefault(picture.size, path)
    if len(sizes) > 1:
        examples = ", ".join(f"{width}x{height} ({path.name})" for (width, height), path in list(sizes.items())[:3])
        raise DataError(f"{source}: images of different sizes ({examples}); give --resize HxW to bring them to one size")
    arrays = [np.asarray(picture.convert("RGB" if colour else "L"), dtype=np.uint8) for picture in pictures]
    stacked = np.stack(arrays)
    return stacked[:, None] if stacked.ndim == 3 else np.moveaxis(stacked, -1, 1)


def _image_files(directory: Path) -> list[Path]:
    return sorted(path for path in directory.iterdir() if path.is_file() and path.suffix.lower() in IMAGE_FILE_SUFFIXES)


def load_image_dataset(path: str | Path, labels: str = "auto", resize: tuple[int, int] | None = None,
                       class_names: list[str] | None = None) -> ImageDataset:
    """Images from an IDX directory (the `train-*` files) or file, `.npy`, `.npz` (`x`, optional `y`), a folder
    of class sub-folders of PNG/JPEG files (labels from the folder names) or a flat folder of images.

    Greyscale and RGB, any size with sides 8..64 pixels (`resize` (H, W) brings other sizes there).
    `labels` "none" drops labels; `class_names` names integer labels (default: the integers as text).
    Errors (DataError) name the file and what is wrong.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or directory")
    raw_labels: np.ndarray | None = None
    names = None
    if path.is_dir() and _find_idx(path, "train", "images") is not None:
        loaded = load_images(path, "train")
        images, raw_labels = _as_nchw(loaded.images, str(path)), loaded.labels
    elif path.is_dir():
        folders = sorted(child for child in path.iterdir() if child.is_dir() and _image_files(child))
        files = _image_files(path)
        if folders and files:
            raise DataError(f"{path}: holds both image files and class folders; use one layout (class folders = labelled)")
        if folders:
            per_class = [_image_files(folder) for folder in folders]
            images = _read_image_files([file for group in per_class for file in group], str(path)) if resize is None else \
                _resize_files([file for group in per_class for file in group], resize, str(path))
            raw_labels = np.repeat(np.arange(len(folders)), [len(group) for group in per_class])
            names = [folder.name for folder in folders]
        elif files:
            images = _read_image_files(files, str(path)) if resize is None else _resize_files(files, resize, str(path))
        else:
            raise DataError(f"{path}: no IDX files, no class folders of images and no PNG/JPEG files")
    elif path.suffix.lower() == ".npz":
        try:
            with np.load(path, allow_pickle=False) as archive:
                if "x" not in archive.files:
                    raise DataError(f"{path}: an .npz needs an array named `x` (and optionally `y`), it holds {archive.files}")
                images = _as_nchw(archive["x"], str(path))
                raw_labels = archive["y"] if "y" in archive.files else None
        except ValueError as error:
            raise DataError(f"{path}: not a readable .npz without pickled objects: {error}") from error
    elif path.suffix.lower() == ".npy":
        try:
            images = _as_nchw(np.load(path, allow_pickle=False), str(path))
        except ValueError as error:
            raise DataError(f"{path}: not a readable .npy without pickled objects: {error}") from error
    else:
        try:
            images = _as_nchw(read_idx(path), str(path))
        except ValueError as error:
            raise DataError(f"{path}: not an image data set (IDX, .npy, .npz or a folder of images): {error}") from error
    if resize is not None and images.shape[2:] != resize:
        images = _resized(images, resize)
    height, width = images.shape[2:]
    if not (MIN_SIDE <= height <= MAX_SIDE and MIN_SIDE <= width <= MAX_SIDE):
        raise DataError(f"{path}: images are {height}x{width} pixels; oodserve fit takes sides of {MIN_SIDE} to {MAX_SIDE} pixels, "
                        "resize them with --resize HxW (for example --resize 32x32)")
    if len(images) < MIN_EXAMPLES:
        raise DataError(f"{path}: {len(images)} images; oodserve fit needs at least {MIN_EXAMPLES} to train and calibrate")
    indices = None
    if raw_labels is not None and labels == "auto":
        if len(raw_labels) != len(images):
            raise DataError(f"{path}: {len(raw_labels)} labels for {len(images)} images")
        indices, found = _encode_labels(np.asarray(raw_labels), str(path), "the labels")
        names = names or ([class_names[int(name)] for name in found] if class_names is not None else found)
        check_class_sizes(indices, names, str(path))
    return ImageDataset(images, indices, names if indices is not None else None, str(path))


def _resize_files(paths: list[Path], size: tuple[int, int], source: str) -> np.ndarray:
    """Image files of any sizes -> (N, C, *size) uint8 (each resized on its own)."""
    groups = [_resized(_read_image_files([file], source), size) for file in paths]
    channels = max(group.shape[1] for group in groups)
    return np.concatenate([np.repeat(group, channels // group.shape[1], axis=1) for group in groups])
