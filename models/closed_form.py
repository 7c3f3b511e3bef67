"""Closed-form models exported as hand-written ONNX graphs whose outputs are known exactly.

Two models, written with `onnx.helper` and computed in float64 inside the graph, so a numpy reference
(`reference_outputs`) reproduces onnxruntime to ~1e-12; the demo bundle and the tests' fixture bundles
are built from them:

- `GaussianDensity`: a diagonal Gaussian on u = (x + 0.5) / 256 in [0, 1]^D (D = 784), output
  `log_prob` (N,) in nats, the same convention as the flows (design.md section 3).
- `LinearGaussianProcess`: features phi = (x / 255 - center) @ projection (N, K), `logits` =
  phi @ weights + bias (N, C) and the Laplace predictive variance ridge * phi^T Sigma phi (N,)
  of a linear-feature Gaussian process (the last layer of SNGP, Liu et al. 2020, without the
  random features), outputs `logits`, `variance`, `features`.

Both are fitted in closed form (`fit_gaussian_density`, `fit_linear_gaussian_process`): numpy only,
seconds. Needs the `onnx` package (train extra).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

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


def save_models(directory: Path, models: Mapping[str, ModelParameters]) -> dict[str, dict[str, Any]]:
    """Write `<name>.onnx` for every model into `directory`; returns the manifest's `models` entries."""
    specs = {}
    for name, parameters in models.items():
        graph = gaussian_density_model(parameters) if isinstance(parameters, GaussianDensity) else linear_gaussian_process_model(parameters)
        file_name = f"{name}.onnx"
        onnx.save_model(graph, directory / file_name)
        specs[name] = {"file": file_name, "inputs": ["x"], "outputs": model_outputs_of(parameters)}
    return specs


def fit_gaussian_density(images: np.ndarray, std_floor: float) -> GaussianDensity:
    """Per-pixel mean and std of u = (x + 0.5) / 256 over images (N, 28, 28); std floored at std_floor."""
    u = (images.reshape(len(images), -1).astype(np.float64) + 0.5) / 256.0
    return GaussianDensity(mean=u.mean(axis=0), std=np.maximum(u.std(axis=0), std_floor))


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


# ---------------------------------------------------------------------------------------------- vectors


LOF_NEIGHBOURS = 20


@dataclass(frozen=True, eq=False)
class VectorReference:
    """Standardisation of feature vectors and a stored reference set for k-nearest-neighbour distances.

    kept: indices (D',) of the input columns the models use (constant columns are left out); mean, scale
    (D',) standardise them; reference (M, D') training rows, standardised and bounded (`bounded_features`); k neighbours; reference_knn (M,)
    each reference row's own mean distance to its k nearest other reference rows.
    """

    kept: np.ndarray
    mean: np.ndarray
    scale: np.ndarray
    reference: np.ndarray
    k: int
    reference_knn: np.ndarray
    lof_k: int
    """Neighbours of the local outlier factor (Breunig et al. 2000; 20 as in scikit-learn and PyOD)."""
    reference_k_distance: np.ndarray
    """(M,) each reference row's distance to its lof_k-th nearest other reference row."""
    reference_lrd: np.ndarray
    """(M,) each reference row's local reachability density among the other reference rows."""
    bound: float = 3.0
    """The neighbour signals compare `bounded_features(standardized, bound)`."""


def _row_mean(values: str, count: str, output: str) -> list[onnx.NodeProto]:
    """Nodes for `output` (N,) = the sum of `values` (N, k) along axis 1 (the graph's `feature_axis`) over `count`."""
    return [
        helper.make_node("ReduceSum", [values, "feature_axis"], [f"{output}_sum"], keepdims=0),
        helper.make_node("Div", [f"{output}_sum", count], [output]),
    ]


def vector_reference_model(model: VectorReference, dimensions: int) -> onnx.ModelProto:
    """ONNX graph on x (N, D) float32: `standardized` (N, D') = (x[:, kept] - mean) / scale in float64,
    `knn_distance` (N,) = mean Euclidean distance, between bounded features (`bounded_features`), to the k nearest
    reference rows (Ramaswamy et al. 2000 score the k-th; the mean is steadier), with ||a - b||^2 = |a|^2 - 2 a.b + |b|^2 clipped at 0, and
    `knn_ratio` (N,) = knn_distance / the mean of those neighbours' own k-NN distances: a local density
    ratio in the spirit of the local outlier factor (Breunig et al. 2000), 1 inside the data; and `lof` (N,), the local
    outlier factor itself over `lof_k` neighbours: reach(x, o) = max(k-distance(o), d(x, o)), lrd(x) = 1 / mean_o
    reach(x, o), lof(x) = mean_o lrd(o) / lrd(x) (Breunig et al. 2000)."""
    reference = np.asarray(model.reference, dtype=np.float64)
    nodes = [
        helper.make_node("Cast", ["x"], ["x_double"], to=TensorProto.DOUBLE),
        helper.make_node("Gather", ["x_double", "kept"], ["selected"], axis=1),
        helper.make_node("Sub", ["selected", "mean"], ["centered"]),
        helper.make_node("Div", ["centered", "scale"], ["standardized"]),
        helper.make_node("Div", ["standardized", "bound"], ["scaled_down"]),
        helper.make_node("Tanh", ["scaled_down"], ["squashed"]),
        helper.make_node("Mul", ["squashed", "bound"], ["bounded"]),
        helper.make_node("Mul", ["bounded", "bounded"], ["squares"]),
        helper.make_node("ReduceSum", ["squares", "feature_axis"], ["row_norms"], keepdims=1),
        helper.make_node("MatMul", ["bounded", "reference_t"], ["dots"]),
        helper.make_node("Mul", ["dots", "minus_two"], ["cross"]),
        helper.make_node("Add", ["row_norms", "cross"], ["partial"]),
        helper.make_node("Add", ["partial", "reference_norms"], ["squared_distances"]),
        helper.make_node("Max", ["squared_distances", "zero"], ["clipped"]),
        helper.make_node("TopK", ["clipped", "k"], ["nearest", "nearest_index"], axis=1, largest=0, sorted=1),
        helper.make_node("Sqrt", ["nearest"], ["nearest_distances"]),
        *_row_mean("nearest_distances", "k_double", "knn_distance"),
        helper.make_node("Gather", ["reference_knn", "nearest_index"], ["neighbour_knn"], axis=0),
        *_row_mean("neighbour_knn", "k_double", "neighbour_mean"),
        helper.make_node("Add", ["neighbour_mean", "tiny"], ["neighbour_floor"]),
        helper.make_node("Div", ["knn_distance", "neighbour_floor"], ["knn_ratio"]),
        helper.make_node("TopK", ["clipped", "lof_k"], ["lof_nearest", "lof_index"], axis=1, largest=0, sorted=1),
        helper.make_node("Sqrt", ["lof_nearest"], ["lof_distances"]),
        helper.make_node("Gather", ["reference_k_distance", "lof_index"], ["neighbour_k_distance"], axis=0),
        helper.make_node("Max", ["lof_distances", "neighbour_k_distance"], ["reach"]),
        *_row_mean("reach", "lof_k_double", "mean_reach"),
        helper.make_node("Gather", ["reference_lrd", "lof_index"], ["neighbour_lrd"], axis=0),
        *_row_mean("neighbour_lrd", "lof_k_double", "mean_neighbour_lrd"),
        helper.make_node("Mul", ["mean_neighbour_lrd", "mean_reach"], ["lof"]),
    ]
    initializers = [
        _constant("kept", np.asarray(model.kept, dtype=np.int64)),
        _constant("mean", np.asarray(model.mean, dtype=np.float64)),
        _constant("scale", np.asarray(model.scale, dtype=np.float64)),
        _constant("feature_axis", np.array([1], dtype=np.int64)),
        _constant("reference_t", np.ascontiguousarray(reference.T)),
        _constant("minus_two", np.array(-2.0, dtype=np.float64)),
        _constant("reference_norms", np.sum(reference * reference, axis=1)[None, :]),
        _constant("zero", np.array(0.0, dtype=np.float64)),
        _constant("k", np.array([model.k], dtype=np.int64)),
        _constant("k_double", np.array(float(model.k), dtype=np.float64)),
        _constant("reference_knn", np.asarray(model.reference_knn, dtype=np.float64)),
        _constant("tiny", np.array(1e-12, dtype=np.float64)),
        _constant("bound", np.array(model.bound, dtype=np.float64)),
        _constant("lof_k", np.array([model.lof_k], dtype=np.int64)),
        _constant("lof_k_double", np.array(float(model.lof_k), dtype=np.float64)),
        _constant("reference_k_distance", np.asarray(model.reference_k_distance, dtype=np.float64)),
        _constant("reference_lrd", np.asarray(model.reference_lrd, dtype=np.float64)),
    ]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", dimensions])]
    outputs = [
        helper.make_tensor_value_info("standardized", TensorProto.DOUBLE, ["N", len(model.kept)]),
        helper.make_tensor_value_info("knn_distance", TensorProto.DOUBLE, ["N"]),
        helper.make_tensor_value_info("knn_ratio", TensorProto.DOUBLE, ["N"]),
        helper.make_tensor_value_info("lof", TensorProto.DOUBLE, ["N"]),
    ]
    return _model(helper.make_graph(nodes, "vector_reference", inputs, outputs, initializers))


def vector_reference_outputs(model: VectorReference, features: np.ndarray) -> dict[str, np.ndarray]:
    """numpy reference of `vector_reference_model`: features (N, D) -> standardized (N, D'), knn_distance (N,),
    knn_ratio (N,)."""
    standardized = (np.asarray(features, dtype=np.float64)[:, model.kept] - model.mean) / model.scale
    index, distance = _nearest(bounded_features(standardized, model.bound), model.reference, model.k)
    neighbour_mean = model.reference_knn[index].mean(axis=1)
    return {"standardized": standardized, "knn_distance": distance, "knn_ratio": distance / (neighbour_mean + 1e-12),
            "lof": _local_outlier_factor(bounded_features(standardized, model.bound), model, skip_self=False)}


def bounded_features(standardized: np.ndarray, bound: float) -> np.ndarray:
    """bound * tanh(z / bound): standardised features as the neighbour signals compare them, about z inside +-bound
    and never beyond it, so one rare value of a nearly constant column (a border pixel, a rare category) cannot
    outweigh every other column's distance."""
    return bound * np.tanh(standardized / bound)


def _local_outlier_factor(queries: np.ndarray, model: VectorReference, skip_self: bool) -> np.ndarray:
    """lof (N,) of standardised queries (N, D') against the reference rows (see `vector_reference_model`)."""
    index, distances = _neighbours(queries, model.reference, model.lof_k, skip_self)
    reach = np.maximum(distances, model.reference_k_distance[index]).mean(axis=1)
    return model.reference_lrd[index].mean(axis=1) * reach


def _neighbours(queries: np.ndarray, reference: np.ndarray, k: int, skip_self: bool) -> tuple[np.ndarray, np.ndarray]:
    """Indices (N, k) of the k nearest reference rows and their distances (N, k), in 1,024-row chunks."""
    indices, distances = [], []
    for start in range(0, len(queries), 1024):
        chunk = queries[start : start + 1024]
        squared = np.sum(chunk**2, axis=1, keepdims=True) - 2.0 * chunk @ reference.T
        squared = np.maximum(squared + np.sum(reference**2, axis=1)[None, :], 0.0)
        order = np.argsort(squared, axis=1, kind="stable")[:, int(skip_self) : k + int(skip_self)]
        indices.append(order)
        distances.append(np.sqrt(np.take_along_axis(squared, order, axis=1)))
    return np.concatenate(indices), np.concatenate(distances)


def vector_reference_leave_one_out(model: VectorReference) -> dict[str, np.ndarray]:
    """`knn_distance` and `knn_ratio` (M,) of the reference rows themselves, each row left out of its own neighbours:
    what `vector_reference_model` gives a new row, for rows it was fitted on (its own outputs would count the row's
    zero distance to itself)."""
    index = np.concatenate([_nearest(model.reference[start : start + 1024], model.reference, model.k, skip_self=True)[0]
                            for start in range(0, len(model.reference), 1024)])
    distance = model.reference_knn
    return {"knn_distance": distance, "knn_ratio": distance / (model.reference_knn[index].mean(axis=1) + 1e-12),
            "lof": _local_outlier_factor(model.reference, model, skip_self=True)}


def _nearest(queries: np.ndarray, reference: np.ndarray, k: int, skip_self: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Indices (N, k) of the k nearest reference rows and the mean distance to them (N,); `skip_self` drops
    each query's first neighbour (the query itself when queries are the reference)."""
    squared = np.sum(queries**2, axis=1, keepdims=True) - 2.0 * queries @ reference.T
    squared = np.maximum(squared + np.sum(reference**2, axis=1)[None, :], 0.0)
    order = np.argsort(squared, axis=1, kind="stable")[:, int(skip_self) : k + int(skip_self)]
    return order, np.sqrt(np.take_along_axis(squared, order, axis=1)).mean(axis=1)


def fit_vector_reference(
    features: np.ndarray, kept: np.ndarray, max_reference: int, k: int, rng: np.random.Generator, bound: float = 3.0
) -> VectorReference:
    """Mean and standard deviation of the kept columns of training features (N, D), and up to
    `max_reference` of its rows, standardised, as the neighbour set."""
    selected = np.asarray(features, dtype=np.float64)[:, kept]
    mean, scale = selected.mean(axis=0), selected.std(axis=0)
    scale = np.where(scale > 0, scale, 1.0)
    rows = rng.choice(len(selected), size=min(max_reference, len(selected)), replace=False)
    reference = bounded_features((selected[np.sort(rows)] - mean) / scale, bound)
    neighbours = min(k, len(rows) - 1)
    own = np.concatenate([_nearest(reference[start : start + 1024], reference, neighbours, skip_self=True)[1]
                          for start in range(0, len(reference), 1024)])
    lof_k = min(LOF_NEIGHBOURS, len(rows) - 1)
    index, distances = _neighbours(reference, reference, lof_k, skip_self=True)
    k_distance = distances[:, -1]
    reach = np.maximum(distances, k_distance[index]).mean(axis=1)
    lrd = 1.0 / np.maximum(reach, 1e-12)
    return VectorReference(
        kept=np.asarray(kept, dtype=np.int64), mean=mean, scale=scale, reference=reference, k=neighbours, reference_knn=own,
        lof_k=lof_k, reference_k_distance=k_distance, reference_lrd=lrd, bound=bound,
    )
