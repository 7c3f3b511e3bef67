"""The contract every registered signal kind keeps (oodserve.scoring.signals.base), checked on random model
outputs: `fit` gives JSON parameters the manifest accepts, and `score` returns (N,) float64, finite or NaN,
row by row (a slice of a batch scores as that slice of the batch's scores, which the batcher relies on)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from oodserve.scoring.signals import SIGNAL_KINDS, SignalSource

IMAGE_SHAPE = (1, 8, 8)
CLASSES = 4
FEATURES = 3

EXAMPLES: dict[str, tuple[SignalSource, dict[str, Any]]] = {
    "bits_per_dim": (SignalSource("flow", "log_prob"), {}),
    "typicality": (SignalSource("flow", "log_prob"), {}),
    "likelihood_ratio": (SignalSource("flow", "log_prob"), {"background_model": "background", "background_output": "log_prob"}),
    "input_complexity": (SignalSource("flow", "log_prob"), {}),
    "model_output": (SignalSource("classifier", "variance"), {"two_sided": True}),
    "max_softmax": (SignalSource("classifier", "logits"), {}),
    "feature_density": (SignalSource("classifier", "features"), {"parameters_file": "feature_density.npz"}),
}
"""One source and set of fit options per registered kind; a new kind must add its example here."""


def random_batch(count: int, seed: int) -> tuple[dict[str, dict[str, np.ndarray]], np.ndarray, np.ndarray]:
    """(outputs of a flow, a background flow and a classifier, images (count, 1, 8, 8) raw 0..255, labels)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, CLASSES, count)
    outputs = {
        "flow": {"log_prob": rng.normal(-150.0, 20.0, count)},
        "background": {"log_prob": rng.normal(-160.0, 20.0, count)},
        "classifier": {
            "logits": rng.normal(0.0, 3.0, (count, CLASSES)),
            "variance": rng.gamma(2.0, 0.5, count),
            "features": rng.normal(0.0, 1.0, (count, FEATURES)) + labels[:, None],
        },
    }
    images = rng.integers(0, 256, (count, *IMAGE_SHAPE)).astype(np.float64)
    return outputs, images, labels


def sliced(outputs: Mapping[str, Mapping[str, np.ndarray]], start: int, stop: int) -> dict[str, dict[str, np.ndarray]]:
    return {model: {name: values[start:stop] for name, values in arrays.items()} for model, arrays in outputs.items()}


def fitted_params(kind: str, labels: bool) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The kind's fit on a reference batch of 200, checked like a manifest entry, and its parameters file's arrays."""
    source, options = EXAMPLES[kind]
    outputs, images, reference_labels = random_batch(200, seed=0)
    fitted = SIGNAL_KINDS[kind].fit(outputs, images, source, options, reference_labels if labels else None)
    json.dumps(fitted.params)  # the manifest stores them as JSON
    registered = SIGNAL_KINDS[kind]
    assert set(registered.required_params) <= set(fitted.params)
    if registered.validate is not None:
        registered.validate(fitted.params, IMAGE_SHAPE)
    return fitted.params, fitted.arrays


def test_every_registered_kind_has_an_example() -> None:
    assert sorted(EXAMPLES) == sorted(SIGNAL_KINDS)


@pytest.mark.parametrize("labels", [True, False], ids=["labelled", "label-free"])
@pytest.mark.parametrize("kind", sorted(SIGNAL_KINDS))
@settings(max_examples=25, deadline=None)
@given(count=st.integers(1, 40), seed=st.integers(0, 2**16), cut=st.tuples(st.floats(0, 1), st.floats(0, 1)))
def test_score_is_a_float64_row_per_instance_and_slices_like_the_batch(
    kind: str, labels: bool, count: int, seed: int, cut: tuple[float, float]
) -> None:
    source = EXAMPLES[kind][0]
    params, arrays = fitted_params(kind, labels)
    outputs, images, _ = random_batch(count, seed)
    scores = SIGNAL_KINDS[kind].score(outputs, images, source, params, arrays=arrays)
    assert isinstance(scores, np.ndarray) and scores.shape == (count,) and scores.dtype == np.float64
    assert np.all(np.isfinite(scores) | np.isnan(scores))
    start = min(int(cut[0] * count), count - 1)
    stop = start + 1 + min(int(cut[1] * (count - start)), count - start - 1)  # a non-empty slice
    part = SIGNAL_KINDS[kind].score(sliced(outputs, start, stop), images[start:stop], source, params, arrays=arrays)
    np.testing.assert_allclose(part, scores[start:stop], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", ["typicality", "model_output"])
def test_fit_learns_from_the_reference_outputs(kind: str) -> None:
    params, _ = fitted_params(kind, labels=False)
    outputs, images, _ = random_batch(200, seed=0)
    if kind == "typicality":
        bits = SIGNAL_KINDS["bits_per_dim"].score(outputs, images, EXAMPLES[kind][0], {})
        assert params["entropy_bpd"] == pytest.approx(float(np.mean(bits)))
    else:
        variance = outputs["classifier"]["variance"]
        assert params["center"] == pytest.approx(variance.mean()) and params["scale"] == pytest.approx(variance.std(), rel=1e-9)


def test_kinds_without_parameters_keep_the_options() -> None:
    for kind in ("bits_per_dim", "likelihood_ratio", "max_softmax"):
        source, options = EXAMPLES[kind]
        outputs, images, labels = random_batch(10, seed=1)
        assert SIGNAL_KINDS[kind].fit(outputs, images, source, options, labels).params == options
    source, options = EXAMPLES["input_complexity"]
    recorded = SIGNAL_KINDS["input_complexity"].fit(*random_batch(10, seed=1)[:2], source, options, None).params
    assert recorded["codec"].startswith("PNG, Pillow ")
