"""Signal kind `bits_per_dim`: the flow's discrete likelihood in bits per dimension (higher = less likely).

Raw likelihood is inverted on simpler images (Nalisnick et al. 2019, "Do deep generative models know
what they don't know?"): bundles report it, and fuse the corrections built on it instead.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from oodserve.scoring.signals.base import (
    NO_ARRAYS,
    ModelOutputs,
    SignalSource,
    bits_per_dim_from_log_prob,
    dimensions_of,
    read_scalar_output,
    register_signal_kind,
)


@register_signal_kind("bits_per_dim", description="bits/dim of the flow's discrete likelihood (higher = less likely)")
def bits_per_dim_signal(
    outputs: ModelOutputs,
    images: np.ndarray,
    source: SignalSource,
    params: Mapping[str, Any],
    *,
    arrays: Mapping[str, np.ndarray] = NO_ARRAYS,
    prepared: np.ndarray | None = None,
) -> np.ndarray:
    """bpd(x) from the source log_prob (N,) in nats. Returns (N,) float64."""
    return bits_per_dim_from_log_prob(read_scalar_output(outputs, source), dimensions_of(images))
