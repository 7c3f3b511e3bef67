"""Signal kind `model_output`: a scalar model output used as a score directly (for example SNGP's
predictive variance, Liu et al. 2020), or its two-sided standardised distance from the reference mean
(for example a multi-scale flow's per-level log-density)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from oodserve.scoring.signals.base import (
    NO_ARRAYS,
    FittedSignal,
    ModelOutputs,
    SignalSource,
    read_scalar_output,
    register_signal_kind,
    require_number,
)


def _validate(params: Mapping[str, Any], input_shape: Sequence[int]) -> None:
    if "sign" in params:
        require_number(params, "sign")
    if "center" in params:
        require_number(params, "center")
    if "scale" in params:
        require_number(params, "scale", positive=True)
    if "two_sided" in params and not isinstance(params["two_sided"], bool):
        raise ValueError(f"params.two_sided must be true or false, got {params['two_sided']!r}")


def fit_model_output(
    outputs: ModelOutputs, images: np.ndarray, source: SignalSource, options: Mapping[str, Any], labels: np.ndarray | None
) -> FittedSignal:
    """Two-sided: center and scale are the reference mean and standard deviation; one-sided: the options."""
    if not options.get("two_sided", False):
        return FittedSignal(dict(options))
    values = read_scalar_output(outputs, source)
    return FittedSignal({**options, "center": float(values.mean()), "scale": float(values.std() + 1e-12)})


@register_signal_kind(
    "model_output",
    description="a scalar model output: sign * (y - center), or |y - center| / scale when two_sided",
    fit=fit_model_output,
    validate=_validate,
)
def model_output_signal(
    outputs: ModelOutputs,
    images: np.ndarray,
    source: SignalSource,
    params: Mapping[str, Any],
    *,
    arrays: Mapping[str, np.ndarray] = NO_ARRAYS,
    prepared: np.ndarray | None = None,
) -> np.ndarray:
    """Scalar output y (N,). params: sign=1, center=0, two_sided=false, scale=1. Returns (N,) float64."""
    values = read_scalar_output(outputs, source)
    center = float(params.get("center", 0.0))
    if params.get("two_sided", False):
        return np.abs(values - center) / float(params.get("scale", 1.0))
    return float(params.get("sign", 1.0)) * (values - center)
