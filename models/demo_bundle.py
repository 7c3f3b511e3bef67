"""Hand-made ONNX bundles whose outputs are known exactly: the tests' fixtures and the demo bundle.

Two closed-form models, written with `onnx.helper` and computed in float64 inside the graph, so
a numpy reference (`reference_outputs`) reproduces onnxruntime to ~1e-12:

- `GaussianDensity`: a diagonal Gaussian on u = (x + 0.5) / 256 in [0, 1]^D (D = 784), output
  `log_prob` (N,) in nats, the same convention as the flows (design.md section 3).
- `LinearGaussianProcess`: features phi = (x / 255 - center) @ projection (N, K), `logits` =
  phi @ weights + bias (N, C) and the Laplace predictive variance ridge * phi^T Sigma phi (N,)
  of a linear-feature Gaussian process (the last layer of SNGP, Liu et al. 2020, without the
  random features), outputs `logits`, `variance`, `features`.

`python -m models.demo_bundle --out models/bundles/demo` fits both on the Fashion-MNIST training
split (numpy only, seconds) and calibrates on the held-out calibration split: the demo bundle
`make run` serves until the trained bundle exists. Needs the `onnx` package (train extra).
"""

from __future__ import annotations

import argparse
import math
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from service.bundle.manifest import Manifest
from service.bundle.writer import write_bundle, write_calibration
from service.scoring.conformal import sort_calibration_scores
from service.scoring.pipeline import (
    FUSED_CALIBRATION_KEY,
    FusionRule,
    SignalDefinition,
    compute_signals,
    fused_calibration_scores,
)
from service.scoring.signals import SignalSource

INPUT_SHAPE = (1, 28, 28)
DIMENSIONS = 28 * 28
OPSET = 17


@dataclass(frozen=True, eq=False)
class GaussianDensity:
    """Diagonal Gaussian on u = (x + 0.5) / 256: mean (D,), std (D,) > 0."""

    mean: np.ndarray
    std: np.ndarray


@dataclass(frozen=True, eq=False)
class LinearGaussianProcess:
    """center (D,), projection (D, K), weights (K, C), bias (C,), variance_matrix (K, K) = ridge * Sigma."""

    center: np.ndarray
    projection: np.ndarray
    weights: np.ndarray
    bias: np.ndarray
    variance_matrix: np.ndarray


def _constant(name: str, value: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.ascontiguousarray(value), name=name)


def _model(graph: onnx.GraphProto) -> onnx.ModelProto:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="oodserve-demo")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _image_input() -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", *INPUT_SHAPE])


def _flatten_nodes() -> list[onnx.NodeProto]:
    """x (N,1,28,28) float32 -> flat (N, D) float64."""
    return [
        helper.make_node("Cast", ["x"], ["x_double"], to=TensorProto.DOUBLE),
        helper.make_node("Reshape", ["x_double", "flat_shape"], ["flat"]),
    ]


def gaussian_density_model(density: GaussianDensity) -> onnx.ModelProto:
    """ONNX graph: log_prob (N,) = sum_d log N(u_d; mean_d, std_d^2), u = (x + 0.5) / 256, in float64."""
    log_normaliser = -float(np.sum(np.log(density.std))) - 0.5 * DIMENSIONS * math.log(2.0 * math.pi)
    nodes = [
        *_flatten_nodes(),
        helper.make_node("Add", ["flat", "half"], ["shifted"]),
        helper.make_node("Div", ["shifted", "levels"], ["u"]),
        helper.make_node("Sub", ["u", "mean"], ["centered"]),
        helper.make_node("Div", ["centered", "std"], ["z"]),
        helper.make_node("Mul", ["z", "z"], ["z_squared"]),
        helper.make_node("ReduceSum", ["z_squared", "sum_axes"], ["sum_squares"], keepdims=0),
        helper.make_node("Mul", ["sum_squares", "minus_half"], ["quadratic"]),
        helper.make_node("Add", ["quadratic", "log_normaliser"], ["log_prob"]),
    ]
    initializers = [
        _constant("flat_shape", np.array([-1, DIMENSIONS], dtype=np.int64)),
        _constant("half", np.array(0.5, dtype=np.float64)),
        _constant("levels", np.array(256.0, dtype=np.float64)),
        _constant("mean", density.mean.astype(np.float64)),
        _constant("std", density.std.astype(np.float64)),
        _constant("sum_axes", np.array([1], dtype=np.int64)),
        _constant("minus_half", np.array(-0.5, dtype=np.float64)),
        _constant("log_normaliser", np.array(log_normaliser, dtype=np.float64)),
    ]
    output = helper.make_tensor_value_info("log_prob", TensorProto.DOUBLE, ["N"])
    return _model(helper.make_graph(nodes, "gaussian_density", [_image_input()], [output], initializers))


def linear_gaussian_process_model(classifier: LinearGaussianProcess) -> onnx.ModelProto:
    """ONNX graph: phi = (x/255 - center) @ projection; logits = phi @ W + b; variance = rowsum((phi @ S) * phi)."""
    nodes = [
        *_flatten_nodes(),
        helper.make_node("Div", ["flat", "pixel_max"], ["scaled"]),
        helper.make_node("Sub", ["scaled", "center"], ["centered"]),
        helper.make_node("MatMul", ["centered", "projection"], ["features"]),
        helper.make_node("MatMul", ["features", "weights"], ["logits_no_bias"]),
        helper.make_node("Add", ["logits_no_bias", "bias"], ["logits"]),
        helper.make_node("MatMul", ["features", "variance_matrix"], ["features_times_matrix"]),
        helper.make_node("Mul", ["features_times_matrix", "features"], ["variance_terms"]),
        helper.make_node("ReduceSum", ["variance_terms", "sum_axes"], ["variance"], keepdims=0),
    ]
    initializers = [
        _constant("flat_shape", np.array([-1, DIMENSIONS], dtype=np.int64)),
        _constant("pixel_max", np.array(255.0, dtype=np.float64)),
        _constant("center", classifier.center.astype(np.float64)),
        _constant("projection", classifier.projection.astype(np.float64)),
        _constant("weights", classifier.weights.astype(np.float64)),
        _constant("bias", classifier.bias.astype(np.float64)),
        _constant("variance_matrix", classifier.variance_matrix.astype(np.float64)),
        _constant("sum_axes", np.array([1], dtype=np.int64)),
    ]
    n_features = classifier.projection.shape[1]
    n_classes = classifier.weights.shape[1]
    outputs = [
        helper.make_tensor_value_info("logits", TensorProto.DOUBLE, ["N", n_classes]),
        helper.make_tensor_value_info("variance", TensorProto.DOUBLE, ["N"]),
        helper.make_tensor_value_info("features", TensorProto.DOUBLE, ["N", n_features]),
    ]
    return _model(helper.make_graph(nodes, "linear_gaussian_process", [_image_input()], outputs, initializers))


def gaussian_log_prob(density: GaussianDensity, images: np.ndarray) -> np.ndarray:
    """numpy reference of `gaussian_density_model`: images (N, ...) raw 0..255 -> log_prob (N,) nats."""
    u = (np.asarray(images, dtype=np.float64).reshape(len(images), -1) + 0.5) / 256.0
    z = (u - density.mean) / density.std
    return -0.5 * np.sum(z * z, axis=1) - np.sum(np.log(density.std)) - 0.5 * u.shape[1] * math.log(2.0 * math.pi)


def linear_gaussian_process_outputs(classifier: LinearGaussianProcess, images: np.ndarray) -> dict[str, np.ndarray]:
    """numpy reference of `linear_gaussian_process_model` -> logits (N, C), variance (N,), features (N, K)."""
    flat = np.asarray(images, dtype=np.float64).reshape(len(images), -1) / 255.0
    features = (flat - classifier.center) @ classifier.projection
    return {
        "logits": features @ classifier.weights + classifier.bias,
        "variance": np.sum((features @ classifier.variance_matrix) * features, axis=1),
        "features": features,
    }


ModelParameters = GaussianDensity | LinearGaussianProcess


def model_outputs_of(parameters: ModelParameters) -> list[str]:
    """The ONNX output names of a demo model."""
    return ["log_prob"] if isinstance(parameters, GaussianDensity) else ["logits", "variance", "features"]


def reference_outputs(models: Mapping[str, ModelParameters], images: np.ndarray) -> dict[str, dict[str, np.ndarray]]:
    """numpy outputs[model][output] of every demo model on images (N, 1, 28, 28) or (N, 28, 28)."""
    outputs: dict[str, dict[str, np.ndarray]] = {}
    for name, parameters in models.items():
        if isinstance(parameters, GaussianDensity):
            outputs[name] = {"log_prob": gaussian_log_prob(parameters, images)}
        else:
            outputs[name] = linear_gaussian_process_outputs(parameters, images)
    return outputs


def calibration_arrays(
    models: Mapping[str, ModelParameters],
    signals: Sequence[Mapping[str, Any]],
    fusion: Mapping[str, Any],
    signal_calibration_images: np.ndarray,
    fusion_calibration_images: np.ndarray,
) -> dict[str, np.ndarray]:
    """Per-signal scores of the first split and `__fused__` statistics of the second (conformal protocol).

    Uses the service's own signal functions on the numpy reference outputs.
    """
    definitions = [
        SignalDefinition(signal["name"], signal["kind"], SignalSource(signal["model"], signal["output"]), signal.get("params", {}))
        for signal in signals
    ]
    rule = FusionRule(method=fusion["method"], signals=tuple(fusion["signals"]))
    first = compute_signals(definitions, reference_outputs(models, signal_calibration_images), _as_batch(signal_calibration_images))
    second = compute_signals(definitions, reference_outputs(models, fusion_calibration_images), _as_batch(fusion_calibration_images))
    sorted_first = {name: sort_calibration_scores(values) for name, values in first.items()}
    return {**sorted_first, FUSED_CALIBRATION_KEY: fused_calibration_scores(sorted_first, second, rule)}


def _as_batch(images: np.ndarray) -> np.ndarray:
    return np.asarray(images, dtype=np.float64).reshape(len(images), *INPUT_SHAPE)


def write_demo_bundle(
    directory: Path | str,
    *,
    models: Mapping[str, ModelParameters],
    signals: Sequence[Mapping[str, Any]],
    fusion: Mapping[str, Any],
    signal_calibration_images: np.ndarray,
    fusion_calibration_images: np.ndarray,
    classifier: Mapping[str, str] | None,
    labels: Sequence[str] | None,
    name: str = "demo",
    version: str = "0.0.1",
    description: str = "hand-made ONNX models with closed-form outputs",
    default_alpha: float = 0.05,
    provenance: Mapping[str, Any] | None = None,
    calibration: Mapping[str, np.ndarray] | None = None,
) -> Manifest:
    """Write the .onnx files, calibration.npz and a verified manifest.json into `directory` (created).

    calibration: precomputed `calibration_arrays` of the same images (computed here when None).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model_specs = {}
    for model_name, parameters in models.items():
        graph = gaussian_density_model(parameters) if isinstance(parameters, GaussianDensity) else linear_gaussian_process_model(parameters)
        file_name = f"{model_name}.onnx"
        onnx.save_model(graph, directory / file_name)
        model_specs[model_name] = {"file": file_name, "inputs": ["x"], "outputs": model_outputs_of(parameters)}
    if calibration is None:
        calibration = calibration_arrays(models, signals, fusion, signal_calibration_images, fusion_calibration_images)
    write_calibration(directory / "calibration.npz", calibration)
    return write_bundle(
        directory,
        {
            "schema_version": 1,
            "name": name,
            "version": version,
            "description": description,
            "input": {"shape": list(INPUT_SHAPE), "dtype": "uint8", "min": 0, "max": 255, "layout": "NCHW"},
            "labels": list(labels) if labels is not None else None,
            "models": model_specs,
            "classifier": dict(classifier) if classifier is not None else None,
            "signals": [dict(signal) for signal in signals],
            "calibration": {"file": "calibration.npz"},
            "fusion": dict(fusion),
            "default_alpha": default_alpha,
            "provenance": dict(provenance)
            if provenance is not None
            else {"data": "synthetic", "seed": 0, "code_version": "test", "created": datetime.now(UTC).date().isoformat()},
        },
    )


def fit_gaussian_density(images: np.ndarray, std_floor: float) -> GaussianDensity:
    """Per-pixel mean and std of u = (x + 0.5) / 256 over images (N, 28, 28); std floored at std_floor."""
    u = (images.reshape(len(images), -1).astype(np.float64) + 0.5) / 256.0
    return GaussianDensity(mean=u.mean(axis=0), std=np.maximum(u.std(axis=0), std_floor))


def mutate(images: np.ndarray, rate: float, rng: np.random.Generator) -> np.ndarray:
    """Replace each pixel with a uniform random value with probability `rate` (Ren et al. 2019 background data)."""
    mask = rng.random(images.shape) < rate
    return np.where(mask, rng.integers(0, 256, images.shape), images).astype(np.uint8)


def fit_linear_gaussian_process(
    images: np.ndarray, labels: np.ndarray, n_classes: int, n_features: int, ridge: float, validation: tuple[np.ndarray, np.ndarray]
) -> LinearGaussianProcess:
    """PCA features (K components of x/255), ridge-regression logits scaled by a temperature chosen on
    validation negative log-likelihood, and the Laplace variance matrix ridge * (ridge I + Phi^T Phi)^-1."""
    flat = images.reshape(len(images), -1).astype(np.float64) / 255.0
    center = flat.mean(axis=0)
    _, _, components = np.linalg.svd(flat[:: max(1, len(flat) // 10000)] - center, full_matrices=False)
    projection = components[:n_features].T
    features = (flat - center) @ projection
    targets = np.eye(n_classes)[labels]
    design = np.hstack([features, np.ones((len(features), 1))])
    solution = np.linalg.solve(design.T @ design + ridge * np.eye(design.shape[1]), design.T @ targets)
    weights, bias = solution[:-1], solution[-1]
    validation_images, validation_labels = validation
    validation_features = (validation_images.reshape(len(validation_images), -1) / 255.0 - center) @ projection
    raw_logits = validation_features @ weights + bias

    def negative_log_likelihood(scale: float) -> float:
        logits = scale * raw_logits
        logits = logits - logits.max(axis=1, keepdims=True)
        log_probabilities = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
        return float(-log_probabilities[np.arange(len(validation_labels)), validation_labels].mean())

    temperature_scale = min(np.linspace(1.0, 30.0, 59), key=negative_log_likelihood)
    covariance = np.linalg.inv(ridge * np.eye(n_features) + features.T @ features)
    return LinearGaussianProcess(
        center=center,
        projection=projection,
        weights=weights * temperature_scale,
        bias=bias * temperature_scale,
        variance_matrix=ridge * covariance,
    )


def _code_version() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


DEMO_FUSION_REASON = (
    "input complexity corrects the density for how compressible an image is (raw likelihood and typicality of a "
    "per-pixel Gaussian are inverted on simpler images such as MNIST) and the linear-GP variance grows with distance "
    "from the training features; provenance.evaluation has each signal's AUROC"
)


def auroc(in_distribution: np.ndarray, out_of_distribution: np.ndarray) -> float:
    """Area under the ROC curve of scores (higher = OOD), Mann-Whitney with average ranks for ties."""
    from sklearn.metrics import roc_auc_score

    labels = np.r_[np.zeros(len(in_distribution)), np.ones(len(out_of_distribution))]
    return float(roc_auc_score(labels, np.r_[in_distribution, out_of_distribution]))


def evaluate_signals(
    models: Mapping[str, ModelParameters],
    signals: Sequence[Mapping[str, Any]],
    fusion: Mapping[str, Any],
    calibration: Mapping[str, np.ndarray],
    in_distribution: np.ndarray,
    out_of_distribution: np.ndarray,
) -> dict[str, float]:
    """AUROC of every signal and of the fused statistic, in-distribution vs OOD images (N, 28, 28)."""
    from service.scoring.conformal import conformal_p_values
    from service.scoring.fusion import fused_statistic

    definitions = [
        SignalDefinition(signal["name"], signal["kind"], SignalSource(signal["model"], signal["output"]), signal.get("params", {}))
        for signal in signals
    ]
    scored = []
    for images in (in_distribution, out_of_distribution):
        values = compute_signals(definitions, reference_outputs(models, images), _as_batch(images))
        p_values = {name: conformal_p_values(calibration[name], values[name]) for name in fusion["signals"]}
        values["fused"] = fused_statistic(fusion["method"], p_values, fusion["signals"])
        scored.append(values)
    return {name: round(auroc(scored[0][name], scored[1][name]), 4) for name in scored[0]}


def build_fashion_mnist_demo(data_directory: Path, out: Path, seed: int = 0, ood_directory: Path | None = None) -> Manifest:
    """Fit the demo models on the Fashion-MNIST training split and write the bundle to `out`."""
    from models.data import FASHION_MNIST_LABELS, bundle_split, load_images

    train_set = load_images(data_directory, "train")
    split = bundle_split(len(train_set.images), seed=seed)
    rng = np.random.default_rng(seed)
    train_images = train_set.images[split.train]
    train_labels = train_set.labels[split.train]
    density = fit_gaussian_density(train_images, std_floor=1.0 / 64.0)
    background = fit_gaussian_density(mutate(train_images, 0.2, rng), std_floor=1.0 / 64.0)
    classifier = fit_linear_gaussian_process(
        train_images,
        train_labels,
        n_classes=len(FASHION_MNIST_LABELS),
        n_features=32,
        ridge=1.0,
        validation=(train_set.images[split.validation], train_set.labels[split.validation]),
    )
    models: dict[str, ModelParameters] = {"density": density, "background": background, "classifier": classifier}
    entropy_bpd = float(np.mean(_bits_per_dim(gaussian_log_prob(density, train_images))))
    signals = [
        {"name": "bits_per_dim", "kind": "bits_per_dim", "model": "density", "output": "log_prob", "params": {}},
        {"name": "typicality", "kind": "typicality", "model": "density", "output": "log_prob", "params": {"entropy_bpd": entropy_bpd}},
        {
            "name": "likelihood_ratio",
            "kind": "likelihood_ratio",
            "model": "density",
            "output": "log_prob",
            "params": {"background_model": "background", "background_output": "log_prob"},
        },
        {"name": "input_complexity", "kind": "input_complexity", "model": "density", "output": "log_prob", "params": {}},
        {"name": "gp_variance", "kind": "model_output", "model": "classifier", "output": "variance", "params": {"sign": 1.0}},
        {"name": "max_softmax", "kind": "max_softmax", "model": "classifier", "output": "logits", "params": {}},
    ]
    fusion = {"method": "fisher", "signals": ["input_complexity", "gp_variance"], "reason": DEMO_FUSION_REASON}
    calibration_indices = split.calibration
    half = len(calibration_indices) // 2
    test_set = load_images(data_directory, "test")
    calibration = calibration_arrays(
        models, signals, fusion, train_set.images[calibration_indices[:half]], train_set.images[calibration_indices[half:]]
    )
    evaluation: dict[str, Any] = {}
    if ood_directory is not None:
        count = 3000
        evaluation = {
            "ood_data": f"first {count} of the Fashion-MNIST test file vs first {count} of the test file in {ood_directory}",
            "auroc": evaluate_signals(
                models, signals, fusion, calibration, test_set.images[:count], load_images(ood_directory, "test").images[:count]
            ),
        }
    accuracy = float(np.mean(np.argmax(linear_gaussian_process_outputs(classifier, test_set.images)["logits"], axis=1) == test_set.labels))
    return write_demo_bundle(
        out,
        models=models,
        signals=signals,
        fusion=fusion,
        signal_calibration_images=train_set.images[calibration_indices[:half]],
        fusion_calibration_images=train_set.images[calibration_indices[half:]],
        classifier={"model": "classifier", "logits": "logits"},
        labels=FASHION_MNIST_LABELS,
        calibration=calibration,
        name="fashion-mnist-demo",
        version="0.1.0",
        description=(
            "Demo bundle (not the trained one): per-pixel Gaussian density, mutated-input background density and a "
            "linear Gaussian-process classifier on 32 PCA features, fitted in closed form on Fashion-MNIST"
        ),
        provenance={
            "data": f"Fashion-MNIST training file at {data_directory}: models fitted on bundle_split(seed={seed}).train, "
            "calibrated on its calibration split (first half per signal, second half fused)",
            "seed": seed,
            "code_version": _code_version(),
            "created": datetime.now(UTC).date().isoformat(),
            "builder": "models/demo_bundle.py",
            "classifier_test_accuracy": round(accuracy, 4),
            "evaluation": evaluation,
        },
    )


def _bits_per_dim(log_prob: np.ndarray) -> np.ndarray:
    return -(log_prob - DIMENSIONS * math.log(256.0)) / (DIMENSIONS * math.log(2.0))


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: build the Fashion-MNIST demo bundle."""
    parser = argparse.ArgumentParser(description="Build the closed-form Fashion-MNIST demo bundle.")
    parser.add_argument("--data", type=Path, default=Path("/usr/share/datasets/fashion-mnist"))
    parser.add_argument("--out", type=Path, default=Path("models/bundles/demo"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ood-data", type=Path, default=None, help="IDX directory of an OOD test set (for example MNIST)")
    arguments = parser.parse_args(argv)
    manifest = build_fashion_mnist_demo(arguments.data, arguments.out, arguments.seed, arguments.ood_data)
    print(f"wrote {arguments.out}: {sorted(manifest.files)}")


if __name__ == "__main__":
    main()
