"""A Prometheus histogram that takes a whole array of observations at once.

prometheus-client's `Histogram.observe` takes one value: a Python loop over the buckets and two locked
increments per value. Per-instance p-values of a scored batch are N values times one series per signal,
so the service records them here: one `np.searchsorted` + `np.bincount` per batch and series, exported
through prometheus-client's own `HistogramMetricFamily` (the same exposition as a `Histogram`: cumulative
`_bucket{le=...}`, `_count`, `_sum`).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence

import numpy as np
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString


class BatchedHistogram(Collector):
    """Counts per label set of values in buckets `le` (the upper bounds, ascending; +Inf is appended).

    `observe_many(label_values, values)` adds (N,) values; a value counts in the first bucket whose bound
    is >= it, as Prometheus' `le` means. NaN counts in no finite bucket (only +Inf) and makes the sum NaN.
    """

    def __init__(self, name: str, documentation: str, label_names: Sequence[str], buckets: Sequence[float]) -> None:
        bounds = [float(bound) for bound in buckets]
        if bounds != sorted(bounds) or len(set(bounds)) != len(bounds):
            raise ValueError(f"histogram {name}: buckets must be strictly ascending, got {bounds}")
        if not bounds or bounds[-1] != float("inf"):
            bounds.append(float("inf"))
        self.name = name
        self.documentation = documentation
        self.label_names = tuple(label_names)
        self._bounds = np.asarray(bounds, dtype=np.float64)
        self._bound_labels = [floatToGoString(bound) for bound in bounds]
        self._counts: dict[tuple[str, ...], np.ndarray] = {}
        self._sums: dict[tuple[str, ...], float] = {}
        self._lock = threading.Lock()

    def observe_many(self, label_values: tuple[str, ...], values: np.ndarray) -> None:
        """Add every value of `values` (any shape, flattened) to the series `label_values`."""
        self.observe_rows([label_values], np.asarray(values, dtype=np.float64).reshape(1, -1))

    def observe_rows(self, label_values: Sequence[tuple[str, ...]], values: np.ndarray) -> None:
        """values: (K, N); row k goes to the series label_values[k]. One search and one count for all K series."""
        rows = np.asarray(values, dtype=np.float64)
        if rows.ndim != 2 or rows.shape[0] != len(label_values):
            raise ValueError(f"histogram {self.name}: expected values of shape ({len(label_values)}, N), got {list(rows.shape)}")
        for labels in label_values:
            if len(labels) != len(self.label_names):
                raise ValueError(f"histogram {self.name}: expected labels {self.label_names}, got {labels}")
        if rows.size == 0:
            return
        bucket_count = self._bounds.size
        placed = np.minimum(np.searchsorted(self._bounds, rows, side="left"), bucket_count - 1)
        placed += np.arange(rows.shape[0])[:, None] * bucket_count
        added = np.bincount(placed.reshape(-1), minlength=rows.shape[0] * bucket_count).reshape(rows.shape[0], bucket_count)
        totals = rows.sum(axis=1).tolist()
        with self._lock:
            for labels, counts, total in zip(label_values, added, totals):
                existing = self._counts.get(labels)
                if existing is None:
                    self._counts[labels] = counts.copy()
                    self._sums[labels] = total
                else:
                    existing += counts
                    self._sums[labels] += total

    def collect(self) -> Iterator[HistogramMetricFamily]:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.label_names)
        with self._lock:
            series = [(labels, counts.copy(), self._sums[labels]) for labels, counts in self._counts.items()]
        for labels, counts, total in series:
            cumulative = np.cumsum(counts).tolist()
            family.add_metric(list(labels), list(zip(self._bound_labels, cumulative)), total)
        yield family

    def describe(self) -> Iterator[HistogramMetricFamily]:
        yield HistogramMetricFamily(self.name, self.documentation, labels=self.label_names)
