"""Test bundles of closed-form ONNX models (`oodserve.models.closed_form`) and an independent numpy oracle of their verdicts."""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from oodserve.config import Settings
from oodserve.models.build.demo import write_closed_form_bundle
from oodserve.models.closed_form import GaussianDensity, LinearGaussianProcess, reference_outputs

D = 28 * 28
LABELS = [f"class-{index}" for index in range(10)]
ENTROPY_BPD = 3.25


def make_models(seed: int = 0) -> dict[str, GaussianDensity | LinearGaussianProcess]:
    """Random but fixed closed-form models: a density, a background density and a linear GP classifier."""
    rng = np.random.default_rng(seed)
    mixing = rng.normal(0.0, 1.0, (8, 8))
    return {
        "flow": GaussianDensity(mean=rng.uniform(0.3, 0.7, D), std=rng.uniform(0.15, 0.35, D)),
        "background": GaussianDensity(mean=np.full(D, 0.5), std=np.full(D, 0.3)),
        "sngp": LinearGaussianProcess(
            center=rng.uniform(0.3, 0.7, D),
            projection=rng.normal(0.0, 0.05, (D, 8)),
            weights=rng.normal(0.0, 1.0, (8, 10)),
            bias=rng.normal(0.0, 0.1, 10),
            variance_matrix=mixing @ mixing.T / 8.0,
        ),
    }


SIGNALS: list[dict[str, Any]] = [
    {"name": "bits_per_dim", "kind": "bits_per_dim", "model": "flow", "output": "log_prob", "params": {}},
    {"name": "typicality", "kind": "typicality", "model": "flow", "output": "log_prob", "params": {"entropy_bpd": ENTROPY_BPD}},
    {
        "name": "likelihood_ratio",
        "kind": "likelihood_ratio",
        "model": "flow",
        "output": "log_prob",
        "params": {"background_model": "background", "background_output": "log_prob"},
    },
    {"name": "input_complexity", "kind": "input_complexity", "model": "flow", "output": "log_prob", "params": {}},
    {"name": "sngp_variance", "kind": "model_output", "model": "sngp", "output": "variance", "params": {"sign": 1.0}},
    {
        "name": "log_prob_two_sided",
        "kind": "model_output",
        "model": "flow",
        "output": "log_prob",
        "params": {"two_sided": True, "center": -400.0, "scale": 50.0},
    },
    {"name": "max_softmax", "kind": "max_softmax", "model": "sngp", "output": "logits", "params": {}},
]
FUSION = {"method": "fisher", "signals": ["typicality", "sngp_variance", "likelihood_ratio"], "reason": "test fusion"}


def sample_images(models: dict[str, Any], count: int, seed: int) -> np.ndarray:
    """In-distribution images (count, 1, 28, 28) uint8: pixels drawn from the density model and rounded."""
    rng = np.random.default_rng(seed)
    density = models["flow"]
    u = rng.normal(density.mean, density.std, (count, D))
    return np.clip(np.rint(u * 256.0 - 0.5), 0, 255).astype(np.uint8).reshape(count, 1, 28, 28)


def build_bundle(
    directory: Path,
    *,
    seed: int = 0,
    fusion: dict[str, Any] | None = None,
    signals: list[dict[str, Any]] | None = None,
    classifier: bool = True,
    name: str = "test-bundle",
    calibration_size: int = 150,
) -> Path:
    """Write a test bundle with the fixed models and synthetic in-distribution calibration data."""
    models = make_models(seed)
    write_closed_form_bundle(
        directory,
        models=models,
        signals=signals if signals is not None else SIGNALS,
        fusion=fusion if fusion is not None else FUSION,
        signal_calibration_images=sample_images(models, calibration_size, seed + 1),
        fusion_calibration_images=sample_images(models, calibration_size, seed + 2),
        classifier={"model": "sngp", "logits": "logits"} if classifier else None,
        labels=LABELS if classifier else None,
        name=name,
        version="1.2.3",
        default_alpha=0.1,
    )
    return directory


def make_settings(bundle: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "bundle": bundle,
        "warmup_batch_size": 2,
        "max_batch_instances": 16,
        "max_body_bytes": 400_000,
        "intra_op_threads": 1,
        "inter_op_threads": 1,
    }
    values.update(overrides)
    return Settings(**values)


def png_bits(image: np.ndarray) -> float:
    buffer = io.BytesIO()
    Image.fromarray(np.asarray(image, dtype=np.uint8).reshape(28, 28)).save(buffer, format="PNG", optimize=False)
    return 8.0 * len(buffer.getvalue())


def brute_force_p_value(calibration: np.ndarray, score: float) -> float:
    """(1 + #{calibration >= score}) / (n + 1), counted element by element."""
    return (1.0 + float(np.sum(calibration >= score))) / (calibration.size + 1.0)


def oracle(models: dict[str, Any], bundle: Path, images: np.ndarray, alpha: float, fusion: dict[str, Any] = FUSION) -> list[dict[str, Any]]:
    """Expected results computed directly from the formulas (independent of oodserve.scoring)."""
    outputs = reference_outputs(models, images)
    log_prob = outputs["flow"]["log_prob"]
    bpd = -(log_prob - D * math.log(256.0)) / (D * math.log(2.0))
    logits = outputs["sngp"]["logits"]
    probabilities = np.exp(logits - logits.max(axis=1, keepdims=True))
    probabilities /= probabilities.sum(axis=1, keepdims=True)
    signals = {
        "bits_per_dim": bpd,
        "typicality": np.abs(bpd - ENTROPY_BPD),
        "likelihood_ratio": -(log_prob - outputs["background"]["log_prob"]),
        "input_complexity": bpd * D - np.array([png_bits(image) for image in images]),
        "sngp_variance": outputs["sngp"]["variance"],
        "log_prob_two_sided": np.abs(log_prob + 400.0) / 50.0,
        "max_softmax": 1.0 - probabilities.max(axis=1),
    }
    with np.load(bundle / "calibration.npz", allow_pickle=False) as archive:
        calibration = {name: archive[name] for name in archive.files}
    results = []
    for index in range(len(images)):
        p_values = {name: brute_force_p_value(calibration[name], values[index]) for name, values in signals.items()}
        chosen = [p_values[name] for name in fusion["signals"]]
        score = -2.0 * sum(math.log(p) for p in chosen) if fusion["method"] == "fisher" else -math.log(min(chosen))
        p_value = brute_force_p_value(calibration["__fused__"], score)
        best = int(np.argmax(probabilities[index]))
        results.append(
            {
                "is_ood": p_value < alpha,
                "score": score,
                "p_value": p_value,
                "signals": {name: float(values[index]) for name, values in signals.items()},
                "p_values": p_values,
                "prediction": {"class_index": best, "label": LABELS[best], "confidence": float(probabilities[index, best])},
            }
        )
    return results


def assert_results_match(served: list[dict[str, Any]], expected: list[dict[str, Any]], tolerance: float = 1e-6) -> None:
    """Served results equal the oracle: verdicts exactly, numbers to `tolerance` (relative and absolute)."""
    assert len(served) == len(expected)
    for got, want in zip(served, expected):
        assert got["is_ood"] == want["is_ood"]
        assert got["score"] == pytest.approx(want["score"], rel=tolerance, abs=tolerance)
        assert got["p_value"] == pytest.approx(want["p_value"], rel=tolerance, abs=tolerance)
        assert set(got["signals"]) == set(want["signals"])
        for name, value in want["signals"].items():
            assert got["signals"][name] == pytest.approx(value, rel=tolerance, abs=tolerance), name
            assert got["p_values"][name] == pytest.approx(want["p_values"][name], rel=tolerance, abs=tolerance), name
        if "prediction" in got:
            assert got["prediction"]["class_index"] == want["prediction"]["class_index"]
            assert got["prediction"]["label"] == want["prediction"]["label"]
            assert got["prediction"]["confidence"] == pytest.approx(want["prediction"]["confidence"], rel=tolerance, abs=tolerance)
