"""Disjoint train / validation / signal-calibration / fusion-calibration splits sized to the data set.

Calibration data is never trained on; the fusion calibration split is separate from the per-signal one so
the fused p-value stays a valid conformal p-value (design.md section 4). The smallest supported alpha is
1 / (n_fusion + 1): below it no fused p-value can fall.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class FitSplit:
    """Index arrays into the data set (sorted, disjoint)."""

    train: np.ndarray
    validation: np.ndarray
    signal_calibration: np.ndarray
    fusion_calibration: np.ndarray

    @property
    def minimum_alpha(self) -> float:
        return 1.0 / (len(self.fusion_calibration) + 1)

    def sizes(self) -> dict[str, int]:
        return {name: int(len(getattr(self, name))) for name in ("train", "validation", "signal_calibration", "fusion_calibration")}


def split_sizes(count: int) -> tuple[int, int, int]:
    """(validation, signal calibration, fusion calibration) sizes for `count` rows: 10% / 15% / 15%, each
    calibration split between 30 and 5,000 rows, validation between 20 and 2,000; the rest trains."""
    validation = int(np.clip(round(0.10 * count), 20, 2000))
    calibration = int(np.clip(round(0.15 * count), 30, 5000))
    if count - validation - 2 * calibration < max(50, count // 3):
        raise ValueError(f"{count} examples are too few to train and calibrate")
    return validation, calibration, calibration


def fit_split(count: int, seed: int, labels: np.ndarray | None = None) -> FitSplit:
    """A seeded split of range(count); with labels, every class is spread over the splits in proportion."""
    validation, signal, fusion = split_sizes(count)
    rng = np.random.default_rng(seed)
    order = rng.permutation(count)
    if labels is not None:  # stratify: interleave the classes in the permuted order
        ranks = np.empty(count)
        for label in np.unique(labels):
            members = order[labels[order] == label]
            ranks[members] = (np.arange(len(members)) + rng.random()) / len(members)
        order = order[np.argsort(ranks[order], kind="stable")]
    parts = np.split(order, np.cumsum([signal, fusion, validation]))
    signal_part, fusion_part, validation_part, train_part = parts
    return FitSplit(np.sort(train_part), np.sort(validation_part), np.sort(signal_part), np.sort(fusion_part))
