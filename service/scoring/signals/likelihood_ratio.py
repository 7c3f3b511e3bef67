"""Signal kind `likelihood_ratio`: -(log p(x) - log p_bg(x)) against a background model trained on
mutated inputs (Ren et al. 2019, "Likelihood ratios for out-of-distribution detection")."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from oodserve.scoring.signals.base import NO_ARRAYS, ModelOutputs, SignalSource, read_scalar_output, register_signal_kind


def background_sources(params: Mapping[str, Any]) -> list[SignalSource]:
    """The background model's log-density output, named by params.background_model / background_output."""
    return [SignalSource(str(params["background_model"]), str(params["background_output"]))]


def _validate(params: Mapping[str, Any], input_shape: Sequence[int]) -> None:
    for key in ("background_model", "background_output"):
        if not isinstance(params.get(key), str):
            raise ValueError(f"params.{key} must be a string, got {params.get(key)!r}")


@register_signal_kind(
    "likelihood_ratio",
    description="-(log p(x) - log p_bg(x)) in nats (Ren et al. 2019): negated likelihood ratio",
    required_params=("background_model", "background_output"),
    extra_sources=background_sources,
    validate=_validate,
)
def likelihood_ratio_signal(
    outputs: ModelOutputs,
    images: np.ndarray,
    source: SignalSource,
    params: Mapping[str, Any],
    *,
    arrays: Mapping[str, np.ndarray] = NO_ARRAYS,
    prepared: np.ndarray | None = None,
) -> np.ndarray:
    """-(log p(x) - log p_bg(x)), both log-densities (N,) in nats. Returns (N,) float64."""
    foreground = read_scalar_output(outputs, source)
    background = read_scalar_output(outputs, background_sources(params)[0])
    return -(foreground - background)
