"""Histograms of calibration scores, for a person to see where an input's score falls among the
in-distribution scores it is compared with (the console's evidence plots)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MAX_BINS = 200


@dataclass(frozen=True)
class ScoreHistogram:
    """`counts[i]` calibration scores lie in [edges[i], edges[i + 1]) (the last bin is closed); `size` scores in all.

    Scores are non-conformity scores: larger is less like the calibration data, and an input's conformal
    p-value is the fraction of calibration scores at or above its own (with the +1 correction).
    """

    edges: np.ndarray
    """(bins + 1,) increasing bin edges spanning the calibration scores."""
    counts: np.ndarray
    """(bins,) integer counts, summing to `size`."""
    size: int

    def to_json(self) -> dict[str, object]:
        return {"edges": self.edges.tolist(), "counts": self.counts.tolist(), "size": self.size}


def calibration_histogram(scores: np.ndarray, bins: int) -> ScoreHistogram:
    """Equal-width histogram of the finite calibration `scores` (n,) over their range in `bins` bins (1..MAX_BINS).

    A constant array gets one unit-wide bin around its value so every edge stays finite and increasing.
    """
    if not 1 <= bins <= MAX_BINS:
        raise ValueError(f"bins must be in 1..{MAX_BINS}, got {bins}")
    values = np.asarray(scores, dtype=np.float64)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return ScoreHistogram(np.array([0.0, 1.0]), np.array([0], dtype=np.int64), 0)
    low, high = float(values.min()), float(values.max())
    if high <= low:
        low, high = low - 0.5, high + 0.5
    counts, edges = np.histogram(values, bins=bins, range=(low, high))
    return ScoreHistogram(edges, counts.astype(np.int64), int(values.size))
