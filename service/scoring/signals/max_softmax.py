"""Signal kind `max_softmax`: 1 - the classifier's maximum softmax probability (Hendrycks and Gimpel
2017, "A baseline for detecting misclassified and out-of-distribution examples")."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from oodserve.scoring.signals.base import NO_ARRAYS, ModelOutputs, SignalSource, read_output, register_signal_kind, softmax


@register_signal_kind("max_softmax", description="1 - max softmax probability of the classifier logits")
def max_softmax_signal(
    outputs: ModelOutputs,
    images: np.ndarray,
    source: SignalSource,
    params: Mapping[str, Any],
    *,
    arrays: Mapping[str, np.ndarray] = NO_ARRAYS,
    prepared: np.ndarray | None = None,
) -> np.ndarray:
    """1 - max_c softmax(logits)_c; the source is the (N, C) logits output. (N,) float64."""
    logits = np.asarray(read_output(outputs, source), dtype=np.float64)
    if logits.ndim != 2:
        raise ValueError(f"{source.model}.{source.output}: expected (N, C) logits, got shape {list(logits.shape)}")
    return 1.0 - np.max(softmax(logits), axis=1)
