"""The one split type: every way of making it gives sorted, disjoint parts that cover the data set."""

from __future__ import annotations

import numpy as np
import pytest

from oodserve.models.splits import DataSplit, bundle_split, fit_split


def assert_partition(split: DataSplit, count: int) -> None:
    parts = [split.train, split.validation, split.signal_calibration, split.fusion_calibration]
    assert all(np.array_equal(part, np.sort(part)) for part in parts)
    joined = np.concatenate(parts)
    assert len(joined) == count and np.array_equal(np.sort(joined), np.arange(count))


@pytest.mark.parametrize("seed", [0, 7])
def test_bundle_split_holds_out_the_same_images_as_every_trainer_and_halves_the_calibration(seed: int) -> None:
    split = bundle_split(1000, n_validation=100, n_calibration=300, seed=seed)
    assert_partition(split, 1000)
    order = np.random.default_rng(seed).permutation(1000)  # the trainers' held-out sets, written out
    assert np.array_equal(split.calibration, np.sort(order[:300]))
    assert np.array_equal(split.validation, np.sort(order[300:400]))
    assert np.array_equal(split.train, np.sort(order[400:]))
    assert len(split.signal_calibration) == len(split.fusion_calibration) == 150
    assert split.minimum_alpha == pytest.approx(1 / 151)


def test_bundle_split_refuses_to_hold_out_everything() -> None:
    with pytest.raises(ValueError, match="cannot hold out"):
        bundle_split(100, n_validation=50, n_calibration=50)


def test_fit_split_is_a_partition_with_every_class_in_every_part() -> None:
    labels = np.repeat(np.arange(4), 250)
    split = fit_split(len(labels), seed=3, labels=labels)
    assert_partition(split, len(labels))
    for part in (split.train, split.validation, split.signal_calibration, split.fusion_calibration):
        assert set(labels[part]) == {0, 1, 2, 3}
    assert split.sizes() == {"train": 600, "validation": 100, "signal_calibration": 150, "fusion_calibration": 150}
