"""Signal kind `typicality`: |bpd(x) - H_train|, the distance of an input's bits/dim from the typical set
(Nalisnick et al. 2019b, "Detecting out-of-distribution inputs to deep generative models using typicality")."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from oodserve.scoring.signals.base import NO_ARRAYS, FittedSignal, ModelOutputs, SignalSource, register_signal_kind, require_number
from oodserve.scoring.signals.bits_per_dim import bits_per_dim_signal


def _validate(params: Mapping[str, Any], input_shape: Sequence[int]) -> None:
    require_number(params, "entropy_bpd")


def fit_typicality(
    outputs: ModelOutputs, images: np.ndarray, source: SignalSource, options: Mapping[str, Any], labels: np.ndarray | None
) -> FittedSignal:
    """H_train = mean bits/dim of the reference (training split) images."""
    entropy_bpd = float(np.mean(bits_per_dim_signal(outputs, images, source, options)))
    return FittedSignal({**options, "entropy_bpd": entropy_bpd})


@register_signal_kind(
    "typicality",
    description="|bpd(x) - H_train| (Nalisnick et al. 2019b): distance from the typical set",
    fit=fit_typicality,
    required_params=("entropy_bpd",),
    validate=_validate,
)
def typicality_signal(
    outputs: ModelOutputs,
    images: np.ndarray,
    source: SignalSource,
    params: Mapping[str, Any],
    *,
    arrays: Mapping[str, np.ndarray] = NO_ARRAYS,
    prepared: np.ndarray | None = None,
) -> np.ndarray:
    """|bpd(x) - params.entropy_bpd|, the training entropy in bits/dim. (N,) float64."""
    return np.abs(bits_per_dim_signal(outputs, images, source, params) - float(params["entropy_bpd"]))
