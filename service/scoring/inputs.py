"""Turning JSON instances (nested lists) into a validated (N, *input_shape) float32 batch."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

_NUMBER_TYPES = (int, float)


class InputError(ValueError):
    """An instance batch that does not fit the input spec; `code` is machine-readable, the message says why."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class MalformedInputError(InputError):
    """A payload that is not what it claims to be (not a .npy, PNG or JPEG; a header that lies): HTTP 400."""


class UnsupportedInputError(InputError):
    """A payload kind this bundle's input cannot take (image files for a vector input): HTTP 415."""


def has_channel_axis(input_shape: Sequence[int]) -> bool:
    """True for image inputs (C, H, W) with a few colour channels (C > 1, fewer than either side)."""
    shape = list(input_shape)
    return len(shape) == 3 and 1 < shape[0] < min(shape[1], shape[2])


def accepted_instance_shapes(input_shape: Sequence[int]) -> list[list[int]]:
    """The instance shape itself; when it has a leading channel of 1, the shape without it; for colour
    images (C, H, W), channels-last (H, W, C) too, as PIL and numpy hold images."""
    shape = list(input_shape)
    if len(shape) > 1 and shape[0] == 1:
        return [shape, shape[1:]]
    if has_channel_axis(shape):
        return [shape, [shape[1], shape[2], shape[0]]]
    return [shape]


def to_input_layout(array: np.ndarray, input_shape: Sequence[int]) -> np.ndarray:
    """A batch (N, *accepted instance shape) as (N, *input_shape): channels-last moved first, a missing
    leading channel of 1 added."""
    shape = list(input_shape)
    if list(array.shape[1:]) == shape:
        return array
    if has_channel_axis(shape) and list(array.shape[1:]) == [shape[1], shape[2], shape[0]]:
        return np.ascontiguousarray(np.moveaxis(array, -1, 1))
    return array.reshape((array.shape[0], *shape))


def _describe(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _first_bad_shape(instances: list[Any], accepted: list[list[int]]) -> str:
    """Message for the first instance whose nesting is ragged or of the wrong shape."""
    wanted = " or ".join(str(shape) for shape in accepted)
    for index, instance in enumerate(instances):
        if not isinstance(instance, list):
            return f"instance {index} must be a nested array of shape {wanted}, got {type(instance).__name__} {_describe(instance)}"
        array = np.asarray(instance, dtype=object)
        ragged = any(isinstance(value, list) for value in array.reshape(-1).tolist())
        if ragged:
            return (
                f"instance {index} must be a nested array of shape {wanted}, "
                "got ragged or too deeply nested arrays (rows of different lengths)"
            )
        if list(array.shape) not in accepted:
            return f"instance {index} must be a nested array of shape {wanted}, got shape {list(array.shape)}"
    return f"instances must all have shape {wanted}, got mixed shapes"


def _mixed_channel_batch(instances: list[Any], accepted: list[list[int]]) -> np.ndarray:
    """A batch mixing instances with and without the leading channel of 1, as one object array; else InputError."""
    if len(accepted) < 2 or accepted[0][0] != 1 or not all(isinstance(instance, list) for instance in instances):
        raise InputError("invalid_shape", _first_bad_shape(instances, accepted))
    full_shape, short_shape = accepted
    lifted = []
    for instance in instances:
        array = np.asarray(instance, dtype=object)
        if list(array.shape) == full_shape and not isinstance(array.reshape(-1)[0], list):
            lifted.append(instance)
        elif list(array.shape) == short_shape and not isinstance(array.reshape(-1)[0], list):
            lifted.append([instance])
        else:
            raise InputError("invalid_shape", _first_bad_shape(instances, accepted))
    values = np.asarray(lifted, dtype=object)
    if list(values.shape[1:]) != full_shape:
        raise InputError("invalid_shape", _first_bad_shape(instances, accepted))
    return values


def _position(flat_index: int, instance_shape: tuple[int, ...]) -> tuple[int, list[int]]:
    batch_index, *rest = np.unravel_index(flat_index, instance_shape)
    return int(batch_index), [int(value) for value in rest]


def _first_position(mask: np.ndarray) -> tuple[int, list[int]]:
    """(instance index, position inside the instance) of the first True of a boolean (N, ...) mask."""
    flat_index = int(np.argmax(mask.reshape(-1)))
    batch_index, *rest = np.unravel_index(flat_index, mask.shape)
    return int(batch_index), [int(value) for value in rest]


def check_image_values(array: np.ndarray, dtype: str, minimum: float, maximum: float) -> None:
    """Value checks of a numeric batch (N, ...) shared by every body type; raises InputError with code
    `invalid_value` (NaN/Inf), `out_of_range` or `invalid_dtype` (non-integers for a uint8 input)."""
    if array.dtype.kind == "f":
        finite = np.isfinite(array)
        if not finite.all():
            index, where = _first_position(~finite)
            raise InputError(
                "invalid_value",
                f"instance {index} has {array[(index, *where)]} at {where}; expected finite numbers in [{minimum:g}, {maximum:g}]",
            )
    if array.dtype.kind in "ui":  # integer dtypes whose whole range fits (uint8 for 0..255) need no range pass
        limits = np.iinfo(array.dtype)
        outside = (array < minimum) | (array > maximum) if limits.min < minimum or limits.max > maximum else None
    else:
        outside = (array < minimum) | (array > maximum)
    if outside is not None and outside.any():
        index, where = _first_position(outside)
        raise InputError(
            "out_of_range",
            f"instance {index} has value {array[(index, *where)]:g} at {where}; expected values in [{minimum:g}, {maximum:g}]",
        )
    if dtype == "uint8" and array.dtype.kind == "f":
        fractional = array != np.floor(array)
        if fractional.any():
            index, where = _first_position(fractional)
            raise InputError(
                "invalid_dtype", f"instance {index} has value {array[(index, *where)]:g} at {where}; input dtype uint8 expects integers"
            )


def instances_to_array(
    instances: Any, input_shape: Sequence[int], dtype: str, minimum: float, maximum: float
) -> np.ndarray:
    """Validate JSON instances and return a (N, *input_shape) float32 batch in the raw scale.

    Accepts each instance in any of `accepted_instance_shapes(input_shape)`.
    Raises InputError for: not a list, an empty batch, wrong or ragged shape, non-numeric
    values (strings, booleans, null), NaN/Inf, values outside [minimum, maximum], and
    non-integer values when dtype is uint8.
    """
    if not isinstance(instances, list):
        raise InputError("invalid_request", f"`instances` must be a JSON array of instances, got {type(instances).__name__}")
    if len(instances) == 0:
        raise InputError("empty_batch", "`instances` is empty; send at least one instance")
    accepted = accepted_instance_shapes(input_shape)
    values = np.asarray(instances, dtype=object)
    if list(values.shape[1:]) not in accepted or any(isinstance(value, list) for value in values.reshape(-1)[:1]):
        values = _mixed_channel_batch(instances, accepted)
    flat_objects = values.reshape(-1).tolist()
    if not all(type(value) in _NUMBER_TYPES for value in flat_objects):
        flat_index = next(index for index, value in enumerate(flat_objects) if type(value) not in _NUMBER_TYPES)
        batch_index, where = _position(flat_index, values.shape)
        bad = flat_objects[flat_index]
        raise InputError(
            "invalid_value",
            f"instance {batch_index} has a non-numeric value {_describe(bad)} ({type(bad).__name__}) at {where}; "
            f"expected numbers in [{minimum:g}, {maximum:g}]",
        )
    try:
        numbers = values.astype(np.float64)
    except OverflowError as error:
        raise InputError(
            "out_of_range", f"a value is too large for float64: {error}; expected numbers in [{minimum:g}, {maximum:g}]"
        ) from error
    check_image_values(numbers, dtype, minimum, maximum)
    return to_input_layout(numbers, input_shape).astype(np.float32)
