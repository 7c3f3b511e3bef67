"""The batch scorer: one `Engine` per process (a Ray actor, or the caller's process for small frames) turning
columns of rows into verdict columns with the same decode, check and score code the server runs.

A batch is a dict of numpy arrays of equal length N (Ray Data's "numpy" batch format). Its payload is one of:

- `features`: one column per feature name of a vector bundle (numbers, or text from CSV files);
- `array`: one column of instances `(N, *instance shape)` (a `.npy` file's rows);
- `encoded`: one column of PNG/JPEG bytes (an image folder, or a Parquet column of encoded images).

Every other column (`source`, `row`, an id) is carried to the output unchanged. A row that cannot be scored
(a missing or non-numeric value, NaN, a value outside the bundle's range, an undecodable image) is not scored;
its `error` column says why, with the code and message the HTTP API would answer with, and its verdict columns
are null. Rows are never dropped: the output has the N rows of the input, in order.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa

from oodserve.bundle.manifest import InputSpec
from oodserve.engine import Engine
from oodserve.runtime.sessions import RuntimeOptions
from oodserve.scoring.inputs import InputError, check_image_values
from oodserve.scoring.payloads import PNG_OR_JPEG, checked_images, image_size, png_to_pixels
from oodserve.scoring.pipeline import BatchScores

ERROR_COLUMN = "error"
"""Null for scored rows; `code: message` for rows that could not be scored."""
ARRAY_COLUMN = "__array__"
"""The column of `.npy` instances the file reader yields."""
ENCODED_COLUMN = "__encoded__"
"""The column of encoded image bytes the file reader yields for image folders."""


@dataclass(frozen=True)
class Payload:
    """Where a batch's instances are: `features` (columns named by the bundle's feature names), `array` or
    `encoded` (the one column `column`)."""

    kind: Literal["features", "array", "encoded"]
    column: str | None = None

    def columns(self, spec: InputSpec) -> list[str]:
        """The input columns the payload consumes (not carried to the output)."""
        if self.kind == "features":
            return list(spec.features or [])
        assert self.column is not None
        return [self.column]


def signal_columns(engine: Engine) -> list[str]:
    """The per-signal output columns, `signal_<name>` and `p_value_<name>`, in manifest order."""
    names = list(engine.reported_signals)
    return [f"signal_{name}" for name in names] + [f"p_value_{name}" for name in names]


def _as_float(values: np.ndarray, name: str, errors: list[str | None]) -> np.ndarray:
    """A feature column (N,) as float64; rows holding a missing or non-numeric value get an error (and NaN)."""
    if values.dtype.kind in "fiu":
        return values.astype(np.float64)
    try:
        if not any(value is None or value == "" for value in values):
            return values.astype(np.float64)
    except (TypeError, ValueError):
        pass
    out = np.full(len(values), np.nan)
    for index, value in enumerate(values.tolist()):
        if value is None or value == "":
            message = f"invalid_value: missing value in column {name!r}"
        else:
            try:
                out[index] = float(value)
                continue
            except (TypeError, ValueError):
                message = f"invalid_value: column {name!r} holds {str(value)[:40]!r}, not a number"
        if errors[index] is None:
            errors[index] = message
    return out


def _row_problems(array: np.ndarray, spec: InputSpec) -> np.ndarray:
    """Rows (N,) bool of `array` (N, ...) that `check_image_values` would refuse (NaN/Inf, out of range,
    non-integers for uint8), found with whole-batch operations."""
    flat = array.reshape(len(array), -1)
    bad = np.zeros(len(array), dtype=bool)
    if flat.dtype.kind == "f":
        with np.errstate(invalid="ignore"):
            bad |= ~np.isfinite(flat).all(axis=1)
            bad |= ((flat < spec.min) | (flat > spec.max)).any(axis=1)
            if spec.dtype == "uint8":
                bad |= (flat != np.floor(flat)).any(axis=1)
    elif flat.dtype.kind in "ui":
        bad |= ((flat < spec.min) | (flat > spec.max)).any(axis=1)
    return bad


class BatchScorer:
    """Builds the Engine once (per Ray actor) and scores batches: `scorer(batch) -> pyarrow.Table`.

    Output columns: the carried input columns, then `error`, `is_ood`, `p_value`, `score`, `signal_<name>` and
    `p_value_<name>` per signal, and `class_index`, `label`, `confidence` when the bundle has a classifier.
    p-values and scores are exactly the server's: the same `Engine.score` over the same float32 images.
    """

    def __init__(self, bundle: str | Path, payload: Payload, alpha: float | None = None, options: RuntimeOptions | None = None,
                 engine: Engine | None = None) -> None:
        self.engine = engine if engine is not None else Engine.load(bundle, options)
        self.engine.check_alpha(alpha)
        self.payload = payload
        self.alpha = alpha
        self.spec = self.engine.manifest.input
        self.labels = self.engine.manifest.labels
        if payload.kind == "features" and not self.spec.features:
            raise InputError("unsupported_input", f"bundle {self.engine.name!r} takes {self.spec.shape} instances, not feature columns")
        if payload.kind == "encoded":
            image_size(self.spec)  # UnsupportedInputError for bundles whose input is not an image

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        consumed = set(self.payload.columns(self.spec))
        count = len(next(iter(batch.values())))
        errors: list[str | None] = [None] * count
        images = self._decode(batch, errors)
        good = np.array([error is None for error in errors], dtype=bool)
        scores = self.engine.score(images[good], self.alpha) if good.any() else None
        columns: dict[str, pa.Array] = {}
        for name, values in batch.items():
            if name not in consumed and name != ERROR_COLUMN:
                columns[name] = pa.array(list(values) if values.ndim > 1 else values)
        columns[ERROR_COLUMN] = pa.array(errors, type=pa.string())
        columns.update(self._verdicts(scores, good))
        return pa.table(columns)

    def _decode(self, batch: dict[str, np.ndarray], errors: list[str | None]) -> np.ndarray:
        """The batch's instances as float32 `(N, *input_shape)` (zeros where a row has an error)."""
        spec = self.spec
        previous = batch.get(ERROR_COLUMN)
        if previous is not None:
            for index, error in enumerate(previous.tolist()):
                if error:
                    errors[index] = str(error)
        if self.payload.kind == "features":
            raw = np.column_stack([_as_float(np.asarray(batch[name]), name, errors) for name in spec.features or []])
        elif self.payload.kind == "array":
            raw = np.asarray(batch[self.payload.column or ARRAY_COLUMN])
        else:
            raw = self._decode_images(batch[self.payload.column or ENCODED_COLUMN], errors)
        bad = _row_problems(raw, spec)
        for index in np.flatnonzero(bad & np.array([error is None for error in errors])).tolist():
            try:
                check_image_values(raw[index : index + 1], spec.dtype, spec.min, spec.max)
            except InputError as error:
                errors[index] = f"{error.code}: {str(error).replace('instance 0 ', 'the row ', 1)}"
        good = np.array([error is None for error in errors], dtype=bool)
        images = np.zeros((len(raw), *spec.shape), dtype=np.float32)
        if good.any():
            images[good] = checked_images(raw[good], spec, int(good.sum()))
        return images

    def _decode_images(self, column: np.ndarray, errors: list[str | None]) -> np.ndarray:
        """PNG/JPEG bytes (N,) -> uint8 pixels in the layout `pngs_to_images` gives (N, *shape) or (N, H, W, 3)."""
        height, width, channels = image_size(self.spec)
        shape = (height, width, 3) if channels == 3 else tuple(self.spec.shape)
        pixels = np.zeros((len(column), *shape), dtype=np.uint8)
        for index, data in enumerate(column.tolist()):
            if errors[index] is not None:
                continue
            if not isinstance(data, bytes | bytearray) or not data:
                errors[index] = "malformed_png: empty or missing image bytes"
                continue
            try:
                pixels[index] = png_to_pixels(bytes(data), height, width, "the image", channels, PNG_OR_JPEG).reshape(shape)
            except InputError as error:
                errors[index] = f"{error.code}: {error}"
        return pixels

    def _verdicts(self, scores: BatchScores | None, good: np.ndarray) -> dict[str, pa.Array]:
        """The verdict columns of N rows: the scored rows' values where `good`, null elsewhere."""
        missing = ~good

        def spread(values: np.ndarray | None, dtype: Any) -> pa.Array:
            full = np.zeros(len(good), dtype=dtype)
            if values is not None:
                full[good] = values
            return pa.array(full, mask=missing)

        names = list(self.engine.reported_signals)
        columns: dict[str, pa.Array] = {
            "is_ood": spread(None if scores is None else scores.is_ood, np.bool_),
            "p_value": spread(None if scores is None else scores.fused_p_value, np.float64),
            "score": spread(None if scores is None else scores.fused_score, np.float64),
        }
        for name in names:
            columns[f"signal_{name}"] = spread(None if scores is None else scores.signals[name], np.float64)
        for name in names:
            columns[f"p_value_{name}"] = spread(None if scores is None else scores.p_values[name], np.float64)
        if self.engine.classifier_logits is not None:
            classes = spread(None if scores is None else scores.predicted_class, np.int64)
            columns["class_index"] = classes
            labels = self.labels
            columns["label"] = pa.array(
                [None if value is None else (labels[value] if labels else str(value)) for value in classes.to_pylist()], type=pa.string()
            )
            columns["confidence"] = spread(None if scores is None else scores.confidence, np.float64)
        return columns
