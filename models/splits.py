"""The one split type: disjoint train / validation / signal-calibration / fusion-calibration index sets.

Calibration data is never trained on; the fusion calibration split is separate from the per-signal one so
the fused p-value stays a valid conformal p-value (design.md section 4). The smallest supported alpha is
1 / (n_fusion + 1): below it no fused p-value can fall.

Two ways to make one:
- `bundle_split`: the fixed held-out split of a training file every trainer in this repository
  (`oodserve train flow`, `oodserve train sngp`) and the Fashion-MNIST bundle builders use, so a checkpoint
  trained with `oodserve train` never saw a bundle's calibration images;
- `fit_split`: a split sized to the data set (`oodserve fit`), stratified by label when there are labels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class DataSplit:
    """Index arrays into the data set (each sorted, all disjoint)."""

    train: np.ndarray
    validation: np.ndarray
    signal_calibration: np.ndarray
    fusion_calibration: np.ndarray

    @property
    def calibration(self) -> np.ndarray:
        """Both calibration parts together, sorted: every index that is never trained on nor validated with."""
        return np.sort(np.concatenate([self.signal_calibration, self.fusion_calibration]))

    @property
    def minimum_alpha(self) -> float:
        return 1.0 / (len(self.fusion_calibration) + 1)

    def sizes(self) -> dict[str, int]:
        return {
            "train": len(self.train),
            "validation": len(self.validation),
            "signal_calibration": len(self.signal_calibration),
            "fusion_calibration": len(self.fusion_calibration),
        }


def bundle_split(n: int, n_validation: int = 2000, n_calibration: int = 10000, seed: int = 0) -> DataSplit:
    """The held-out split of `n` training-file examples every trainer and the Fashion-MNIST builders use: `n_calibration`
    calibration and `n_validation` validation examples drawn by one seeded permutation, the rest trains; the calibration
    part is halved at random (seeded too), one half calibrating each signal, the other the fused statistic."""
    if n_validation + n_calibration >= n:
        raise ValueError(f"cannot hold out {n_validation}+{n_calibration} of {n} examples")
    order = np.random.default_rng(seed).permutation(n)
    calibration = np.sort(order[:n_calibration])
    validation = np.sort(order[n_calibration : n_calibration + n_validation])
    train = np.sort(order[n_calibration + n_validation :])
    halves = np.array_split(np.random.default_rng(seed).permutation(calibration), 2)
    return DataSplit(train, validation, np.sort(halves[0]), np.sort(halves[1]))


def split_sizes(count: int) -> tuple[int, int, int]:
    """(validation, signal calibration, fusion calibration) sizes for `count` rows: 10% / 15% / 15%, each
    calibration split between 30 and 5,000 rows, validation between 20 and 2,000; the rest trains."""
    validation = int(np.clip(round(0.10 * count), 20, 2000))
    calibration = int(np.clip(round(0.15 * count), 30, 5000))
    if count - validation - 2 * calibration < max(50, count // 3):
        raise ValueError(f"{count} examples are too few to train and calibrate")
    return validation, calibration, calibration


def fit_split(count: int, seed: int, labels: np.ndarray | None = None) -> DataSplit:
    """A seeded split of range(count) sized by `split_sizes`; with labels (N,), every class is spread over the
    splits in proportion."""
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
    return DataSplit(np.sort(train_part), np.sort(validation_part), np.sort(signal_part), np.sort(fusion_part))
