"""Signal kinds against their formulas, and the registry's extension point."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
from PIL import Image

from oodserve.scoring.signals import (
    SIGNAL_KINDS,
    SignalSource,
    bits_per_dim_from_log_prob,
    png_length_bits,
    register_signal_kind,
)

D = 784
SOURCE = SignalSource("flow", "log_prob")


def run(kind: str, outputs: dict, images: np.ndarray, params: dict | None = None, source: SignalSource = SOURCE) -> np.ndarray:
    return SIGNAL_KINDS[kind].score(outputs, images, source, params or {})


def test_uniform_density_has_eight_bits_per_dim() -> None:
    """log p(u) = 0 on [0,1]^D is the uniform density: exactly 8 bits per 8-bit pixel."""
    images = np.zeros((2, 1, 28, 28))
    np.testing.assert_allclose(run("bits_per_dim", {"flow": {"log_prob": np.zeros(2)}}, images), [8.0, 8.0])
    assert bits_per_dim_from_log_prob(np.array([D * math.log(2.0)]), D)[0] == pytest.approx(7.0)


def test_typicality_is_distance_from_entropy() -> None:
    log_prob = np.array([0.0, D * math.log(2.0) * 2])  # 8 and 6 bits/dim
    got = run("typicality", {"flow": {"log_prob": log_prob}}, np.zeros((2, 1, 28, 28)), {"entropy_bpd": 7.0})
    np.testing.assert_allclose(got, [1.0, 1.0])


def test_likelihood_ratio_is_negated_log_ratio() -> None:
    outputs = {"flow": {"log_prob": np.array([-10.0, -3.0])}, "bg": {"log_prob": np.array([-12.0, -1.0])}}
    got = run("likelihood_ratio", outputs, np.zeros((2, 1, 28, 28)), {"background_model": "bg", "background_output": "log_prob"})
    np.testing.assert_allclose(got, [-2.0, 2.0])


def test_input_complexity_subtracts_png_bits() -> None:
    rng = np.random.default_rng(0)
    images = np.stack([np.zeros((1, 28, 28)), rng.integers(0, 256, (1, 28, 28))]).astype(np.float64)
    lengths = []
    for image in images:
        buffer = io.BytesIO()
        Image.fromarray(image[0].astype(np.uint8)).save(buffer, format="PNG", optimize=False)
        lengths.append(8 * len(buffer.getvalue()))
    np.testing.assert_allclose(png_length_bits(images), lengths)
    assert lengths[0] < lengths[1]  # a blank image compresses far better than noise
    got = run("input_complexity", {"flow": {"log_prob": np.zeros(2)}}, images)
    np.testing.assert_allclose(got, [8.0 * D - lengths[0], 8.0 * D - lengths[1]])


def test_model_output_one_and_two_sided() -> None:
    outputs = {"sngp": {"variance": np.array([[1.0], [4.0]])}}
    source = SignalSource("sngp", "variance")
    images = np.zeros((2, 1, 28, 28))
    np.testing.assert_allclose(run("model_output", outputs, images, {}, source), [1.0, 4.0])
    np.testing.assert_allclose(run("model_output", outputs, images, {"sign": -1.0, "center": 1.0}, source), [0.0, -3.0])
    np.testing.assert_allclose(
        run("model_output", outputs, images, {"two_sided": True, "center": 2.0, "scale": 0.5}, source), [2.0, 4.0]
    )
    with pytest.raises(ValueError, match="one value per instance"):
        run("model_output", {"sngp": {"variance": np.ones((2, 3))}}, images, {}, source)


def test_max_softmax_is_one_minus_top_probability() -> None:
    logits = np.array([[0.0, 0.0], [math.log(3.0), 0.0]])
    got = run("max_softmax", {"sngp": {"logits": logits}}, np.zeros((2, 1, 28, 28)), {}, SignalSource("sngp", "logits"))
    np.testing.assert_allclose(got, [0.5, 0.25])


def test_registry_refuses_duplicates_and_accepts_new_kinds() -> None:
    with pytest.raises(ValueError, match="already registered"):
        register_signal_kind("bits_per_dim", description="duplicate")(lambda outputs, images, source, params: images)
    try:

        @register_signal_kind("test_mean_pixel", description="mean pixel value")
        def mean_pixel(outputs, images, source, params):  # type: ignore[no-untyped-def]
            return images.reshape(len(images), -1).mean(axis=1)

        got = run("test_mean_pixel", {}, np.full((3, 1, 28, 28), 2.0))
        np.testing.assert_allclose(got, [2.0, 2.0, 2.0])
    finally:
        SIGNAL_KINDS.pop("test_mean_pixel", None)
