"""Checking numeric image arrays (from .npy, PNG or v2 tensors) against the input spec, vectorised."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from oodserve.scoring.inputs import InputError, accepted_instance_shapes, check_image_values, to_input_layout

ACCEPTED_ARRAY_KINDS = "uif"
"""numpy dtype kinds an image array may have: unsigned and signed integers, floats."""


def check_batch_shape(shape: Sequence[int], input_shape: Sequence[int], max_instances: int) -> None:
    """A declared batch shape (N, *instance shape), checked before any data is read or allocated: InputError
    `invalid_shape`, `empty_batch` or `too_many_instances` (more than max_instances)."""
    accepted = accepted_instance_shapes(input_shape)
    wanted = " or ".join(str([-1, *instance]) for instance in accepted)
    if len(shape) < 1 or list(shape[1:]) not in accepted:
        raise InputError("invalid_shape", f"array must have shape {wanted} (a batch of instances), got shape {list(shape)}")
    count = int(shape[0])
    if count == 0:
        raise InputError("empty_batch", "the array holds no instances; send at least one")
    if count > max_instances:
        raise InputError("too_many_instances", f"got {count} instances; at most {max_instances} per request")


def check_image_array(
    array: np.ndarray,
    input_shape: Sequence[int],
    dtype: str,
    minimum: float,
    maximum: float,
    max_instances: int,
) -> np.ndarray:
    """array (N, *instance shape) of any integer or float dtype -> validated float32 (N, *input_shape).

    The instance shape may be the input shape, or the shape without a leading channel of 1, or for
    colour images channels-last (H, W, C).
    Raises InputError with code: `invalid_dtype` (booleans, complex, strings, structured; or
    non-integers for a uint8 input), `invalid_shape`, `empty_batch`, `too_many_instances`
    (more than max_instances), `invalid_value` (NaN/Inf) or `out_of_range`.
    """
    if array.dtype.kind not in ACCEPTED_ARRAY_KINDS or array.dtype.fields is not None:
        raise InputError("invalid_dtype", f"array dtype {array.dtype.str!r} is not accepted; send integers or floats")
    check_batch_shape(list(array.shape), input_shape, max_instances)
    check_image_values(array, dtype, minimum, maximum)
    return to_input_layout(array, input_shape).astype(np.float32)
