"""Feature-space heads of a backbone bundle: fitted in numpy on training-split features and logits, exported as
one ONNX graph `features_in (N, D), logits_in (N, K) -> features, logits, <head outputs> (N,)`.

Each head has a numpy `score` (the reference the ONNX graph is parity-tested against) and its ONNX nodes:

- `knn_distance`: distance of the L2-normalised features to their k-th nearest L2-normalised training feature
  (Sun et al. 2022, "Out-of-distribution detection with deep nearest neighbors");
- `mahalanobis`: min over classes of the Mahalanobis distance with one shared covariance (Lee et al. 2018);
  `relative_mahalanobis`: that minus the distance under one Gaussian of all training features (Ren et al. 2021);
- `energy` = -logsumexp(logits) (Liu et al. 2020), `max_logit` (Hendrycks et al. 2022), `msp` the maximum
  softmax probability (Hendrycks and Gimpel 2017): from the backbone's own logits;
- `vim`: alpha * ||residual of the features off the principal subspace|| - logsumexp(logits), origin -pinv(W) b of
  the logits' linear map (least squares of logits on features when the map is not a plain Gemm) (Wang et al. 2022);
- `gp_variance`: SNGP's random-feature Gaussian process on frozen features (Liu et al. 2020): phi = sqrt(2/M)
  cos(h W + b) of the standardised features h, posterior precision I + Phi^T Phi over the training split, variance
  phi^T Sigma phi (ridge 1): it grows with the distance from the training features;
- `pca`: the PCA-whitened features the flow head reads (the flow itself is trained in torch and merged in).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

HEAD_OUTPUTS = ("knn_distance", "mahalanobis", "relative_mahalanobis", "energy", "max_logit", "msp", "vim", "gp_variance")


@dataclass(frozen=True)
class HeadsFit:
    """Every fitted head's parameters (float32 arrays as served)."""

    knn_bank: np.ndarray
    """(M, D) L2-normalised training features."""
    knn_k: int
    class_whitener: np.ndarray
    """(D, D) L with L L^T the shared precision."""
    class_means_white: np.ndarray
    """(K, D) class means times L."""
    background_mean: np.ndarray
    background_whitener: np.ndarray
    vim_origin: np.ndarray
    vim_residual: np.ndarray
    """(D, D - p) basis of the residual space."""
    vim_alpha: float
    gp_mean: np.ndarray
    gp_scale: np.ndarray
    gp_weights: np.ndarray
    """(D, M) random projection (divided by the length scale)."""
    gp_bias: np.ndarray
    gp_covariance: np.ndarray
    """(M, M) posterior covariance (I + Phi^T Phi)^-1."""
    pca_mean: np.ndarray
    pca_projection: np.ndarray
    """(D, p) principal axes divided by the root eigenvalues: (f - mean) @ projection is whitened."""
    logit_weight: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.float32))
    """(K, D) and (K,): the least-squares affine map features -> logits (exact when the features feed the logits' Gemm)."""
    logit_bias: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    figures: dict[str, float] = field(default_factory=dict)


def l2_normalise(features: np.ndarray) -> np.ndarray:
    values = np.asarray(features, dtype=np.float64)
    return values / np.maximum(np.linalg.norm(values, axis=1, keepdims=True), 1e-12)


def _whitener(covariance: np.ndarray) -> np.ndarray:
    """L with L L^T = covariance^-1 (eigen-decomposition, eigenvalues floored for a singular covariance)."""
    values, vectors = np.linalg.eigh(covariance)
    floor = max(float(values.max()) * 1e-6, 1e-12)
    return vectors / np.sqrt(np.maximum(values, floor))


KNN_BANK_ROWS = 10000
"""The kNN head keeps a uniform sample of at most this many training features: its similarity matrix and top-k are the
heads' largest serving cost (measured: with all 50,000 CIFAR-10 rows they cost about a fifth of a ResNet-20 at batch 64).
Sun et al. (2022, table on sampling ratios) find a sampled bank with k scaled in proportion nearly as good."""


def knn_neighbours(train_rows: int) -> int:
    """k of the kNN head for a bank of `train_rows`: 50 for 50,000 rows as in Sun et al. (2022), in proportion below,
    at least 1."""
    return int(np.clip(round(50 * train_rows / 50000), 1, 50))


def fit_heads(features: np.ndarray, logits: np.ndarray, labels: np.ndarray, *, seed: int = 0, knn_rows: int = KNN_BANK_ROWS,
              gp_features: int = 512, vim_dimension: int | None = None, pca_variance: float = 0.999) -> HeadsFit:
    """Fit every head on training features (N, D), logits (N, K) and labels (N,) in 0..K-1."""
    rng = np.random.default_rng(seed)
    x = np.asarray(features, dtype=np.float64)
    count, dimension = x.shape
    classes = logits.shape[1]
    bank_rows = rng.choice(count, size=min(count, knn_rows), replace=False) if count > knn_rows else np.arange(count)
    bank = l2_normalise(x[bank_rows]).astype(np.float32)
    present = [c for c in range(classes) if np.any(labels == c)]
    means = np.stack([x[labels == c].mean(axis=0) if c in present else np.full(dimension, np.nan) for c in range(classes)])
    centred = x - means[labels]
    shared = centred.T @ centred / count
    whitener = _whitener(shared)
    means_white = means @ whitener
    means_white[np.isnan(means_white)] = 1e6  # a class without training rows is never the nearest
    background_mean = x.mean(axis=0)
    background = _whitener(np.cov(x, rowvar=False, bias=True))
    # ViM: origin from the logits' linear map (least squares, exact for a Gemm head), principal space of the centred features.
    design = np.hstack([x, np.ones((count, 1))])
    solution, *_ = np.linalg.lstsq(design, np.asarray(logits, dtype=np.float64), rcond=None)
    weight, bias = solution[:-1].T, solution[-1]
    origin = -np.linalg.pinv(weight) @ bias
    shifted = x - origin
    eigenvalues, eigenvectors = np.linalg.eigh(shifted.T @ shifted / count)
    order = np.argsort(eigenvalues)[::-1]
    principal = vim_dimension or (1000 if dimension >= 2048 else 512 if dimension >= 768 else max(1, dimension // 2))
    principal = min(principal, dimension - 1)
    residual_basis = eigenvectors[:, order[principal:]]
    residual_norm = np.linalg.norm(shifted @ residual_basis, axis=1)
    alpha = float(np.asarray(logits, dtype=np.float64).max(axis=1).mean() / max(residual_norm.mean(), 1e-12))
    # GP head: random Fourier features of the standardised features.
    gp_mean, gp_scale = x.mean(axis=0), x.std(axis=0) + 1e-6
    standardized = (x - gp_mean) / gp_scale
    pairs = rng.integers(0, count, size=(min(count, 2000), 2))
    length_scale = float(np.median(np.linalg.norm(standardized[pairs[:, 0]] - standardized[pairs[:, 1]], axis=1))) or 1.0
    projection = rng.standard_normal((dimension, gp_features)) / length_scale
    phase = rng.uniform(0, 2 * np.pi, gp_features)
    precision = np.eye(gp_features)
    for start in range(0, count, 8192):
        phi = np.sqrt(2.0 / gp_features) * np.cos(standardized[start:start + 8192] @ projection + phase)
        precision += phi.T @ phi
    covariance = np.linalg.inv(precision)
    # PCA whitening for the flow.
    pca_values, pca_vectors = np.linalg.eigh(np.cov(x, rowvar=False, bias=True))
    order = np.argsort(pca_values)[::-1]
    pca_values, pca_vectors = pca_values[order], pca_vectors[:, order]
    share = np.cumsum(pca_values) / pca_values.sum()
    kept = int(min(dimension, max(2, np.searchsorted(share, pca_variance) + 1)))
    pca_projection = pca_vectors[:, :kept] / np.sqrt(np.maximum(pca_values[:kept], 1e-12))
    f32 = np.float32
    return HeadsFit(
        knn_bank=bank, knn_k=knn_neighbours(len(bank)), class_whitener=whitener.astype(f32),
        class_means_white=means_white.astype(f32), background_mean=background_mean.astype(f32),
        background_whitener=background.astype(f32), vim_origin=origin.astype(f32), vim_residual=residual_basis.astype(f32),
        vim_alpha=alpha, gp_mean=gp_mean.astype(f32), gp_scale=gp_scale.astype(f32), gp_weights=projection.astype(f32),
        gp_bias=phase.astype(f32), gp_covariance=covariance.astype(f32),
        pca_mean=background_mean.astype(f32),
        pca_projection=pca_projection.astype(f32), logit_weight=weight.astype(f32), logit_bias=bias.astype(f32),
        figures={"knn_bank_rows": float(len(bank)), "knn_k": float(knn_neighbours(len(bank))),
                 "vim_principal": float(principal),
                 "gp_features": float(gp_features), "gp_length_scale": length_scale, "pca_components": float(kept),
                 "logit_map_residual": float(np.abs(design @ solution - logits).max())},
    )


def _logsumexp(logits: np.ndarray) -> np.ndarray:
    top = logits.max(axis=1, keepdims=True)
    return (top + np.log(np.exp(logits - top).sum(axis=1, keepdims=True)))[:, 0]


def score_heads(fit: HeadsFit, features: np.ndarray, logits: np.ndarray) -> dict[str, np.ndarray]:
    """The numpy reference of every head: (N,) float64 per output name in HEAD_OUTPUTS, plus `pca` (N, p)."""
    x = np.asarray(features, dtype=np.float64)
    z = np.asarray(logits, dtype=np.float64)
    normalised, bank = l2_normalise(x), fit.knn_bank.T.astype(np.float64)
    kth = np.empty(len(x))
    for start in range(0, len(x), 512):  # (512, bank rows) similarities at a time
        similarity = normalised[start:start + 512] @ bank
        kth[start:start + 512] = -np.partition(-similarity, fit.knn_k - 1, axis=1)[:, fit.knn_k - 1]
    white = x @ fit.class_whitener
    means = fit.class_means_white.astype(np.float64)
    distances = (white**2).sum(axis=1, keepdims=True) - 2 * white @ means.T + (means**2).sum(axis=1)
    nearest = distances.min(axis=1)
    background = (((x - fit.background_mean) @ fit.background_whitener) ** 2).sum(axis=1)
    energy = -_logsumexp(z)
    softmax = np.exp(z - z.max(axis=1, keepdims=True))
    softmax /= softmax.sum(axis=1, keepdims=True)
    residual = np.linalg.norm((x - fit.vim_origin) @ fit.vim_residual, axis=1)
    standardized = (x - fit.gp_mean) / fit.gp_scale
    phi = np.sqrt(2.0 / fit.gp_bias.size) * np.cos(standardized @ fit.gp_weights + fit.gp_bias)
    return {
        "knn_distance": np.sqrt(np.maximum(2.0 - 2.0 * kth, 0.0)),
        "mahalanobis": nearest,
        "relative_mahalanobis": nearest - background,
        "energy": energy,
        "max_logit": z.max(axis=1),
        "msp": softmax.max(axis=1),
        "vim": fit.vim_alpha * residual + energy,
        "gp_variance": ((phi @ fit.gp_covariance) * phi).sum(axis=1),
        "pca": (x - fit.pca_mean) @ fit.pca_projection,
    }


class _Builder:
    """Small helper to write ONNX nodes with unique names."""

    def __init__(self, opset: int) -> None:
        self.opset = opset
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.count = 0

    def const(self, value: np.ndarray | float | int, name: str, dtype: type = np.float32) -> str:
        self.inits.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def op(self, op_type: str, inputs: list[str], output: str | None = None, **attributes: Any) -> str:
        self.count += 1
        out = output or f"h_{op_type.lower()}_{self.count}"
        self.nodes.append(helper.make_node(op_type, inputs, [out], **attributes))
        return out

    def reduce(self, op_type: str, source: str, axis: int, output: str | None = None, keepdims: int = 0) -> str:
        if self.opset >= (13 if op_type == "ReduceSum" else 18):
            axes = self.const(np.asarray([axis]), f"h_axes_{self.count + 1}", np.int64)
            return self.op(op_type, [source, axes], output, keepdims=keepdims)
        return self.op(op_type, [source], output, axes=[axis], keepdims=keepdims)


def heads_model(fit: HeadsFit, dimension: int, classes: int, opset: int, ir_version: int) -> onnx.ModelProto:
    """The heads as one ONNX graph: inputs features_in (N, D), logits_in (N, K); outputs features, logits, pca and HEAD_OUTPUTS (N,)."""
    b = _Builder(opset)
    f, z = "features_in", "logits_in"
    b.op("Identity", [f], "features")
    b.op("Identity", [z], "logits")
    # kNN on L2-normalised features.
    norm = b.op("Sqrt", [b.op("Max", [b.reduce("ReduceSum", b.op("Mul", [f, f]), 1, keepdims=1), b.const(1e-24, "h_tiny")])])
    similarity = b.op("MatMul", [b.op("Div", [f, norm]), b.const(fit.knn_bank.T, "h_knn_bank_t")])
    top = helper.make_node("TopK", [similarity, b.const(np.asarray([fit.knn_k]), "h_knn_k", np.int64)], ["h_topk_values", "h_topk_indices"],
                           axis=1, largest=1, sorted=1)
    b.nodes.append(top)
    kth = b.op("Gather", ["h_topk_values", b.const(np.asarray(fit.knn_k - 1), "h_knn_last", np.int64)], axis=1)
    gap = b.op("Max", [b.op("Sub", [b.const(2.0, "h_two"), b.op("Mul", [b.const(2.0, "h_two_b"), kth])]), b.const(0.0, "h_zero")])
    b.op("Sqrt", [gap], "knn_distance")
    # Class-conditional Gaussian, shared covariance; relative to one Gaussian of all features.
    white = b.op("MatMul", [f, b.const(fit.class_whitener, "h_class_whitener")])
    own = b.reduce("ReduceSum", b.op("Mul", [white, white]), 1, keepdims=1)
    cross = b.op("MatMul", [white, b.const(-2.0 * fit.class_means_white.T, "h_class_means_t")])
    means_norm = b.const((fit.class_means_white.astype(np.float64) ** 2).sum(axis=1).astype(np.float32), "h_class_means_norm")
    distances = b.op("Add", [b.op("Add", [own, cross]), means_norm])
    nearest = b.reduce("ReduceMin", distances, 1, "mahalanobis")
    background_white = b.op("MatMul", [b.op("Sub", [f, b.const(fit.background_mean, "h_background_mean")]),
                                       b.const(fit.background_whitener, "h_background_whitener")])
    background = b.reduce("ReduceSum", b.op("Mul", [background_white, background_white]), 1)
    b.op("Sub", [nearest, background], "relative_mahalanobis")
    # Logit heads.
    top_logit = b.reduce("ReduceMax", z, 1, "max_logit")
    top_keep = b.reduce("ReduceMax", z, 1, keepdims=1)
    exponentials = b.op("Exp", [b.op("Sub", [z, top_keep])])
    total = b.reduce("ReduceSum", exponentials, 1)
    logsumexp = b.op("Add", [top_logit, b.op("Log", [total])])
    energy = b.op("Neg", [logsumexp], "energy")
    b.op("Reciprocal", [total], "msp")  # max softmax = exp(0) / sum exp(z - max z)
    # ViM.
    residual = b.op("MatMul", [b.op("Sub", [f, b.const(fit.vim_origin, "h_vim_origin")]), b.const(fit.vim_residual, "h_vim_residual")])
    residual_norm = b.op("Sqrt", [b.reduce("ReduceSum", b.op("Mul", [residual, residual]), 1)])
    b.op("Add", [b.op("Mul", [residual_norm, b.const(fit.vim_alpha, "h_vim_alpha")]), energy], "vim")
    # GP head.
    standardized = b.op("Div", [b.op("Sub", [f, b.const(fit.gp_mean, "h_gp_mean")]), b.const(fit.gp_scale, "h_gp_scale")])
    phase = b.op("Add", [b.op("MatMul", [standardized, b.const(fit.gp_weights, "h_gp_weights")]), b.const(fit.gp_bias, "h_gp_bias")])
    phi = b.op("Mul", [b.op("Cos", [phase]), b.const(np.sqrt(2.0 / fit.gp_bias.size), "h_gp_amplitude")])
    b.reduce("ReduceSum", b.op("Mul", [b.op("MatMul", [phi, b.const(fit.gp_covariance, "h_gp_covariance")]), phi]), 1, "gp_variance")
    # PCA-whitened features for the flow.
    b.op("MatMul", [b.op("Sub", [f, b.const(fit.pca_mean, "h_pca_mean")]), b.const(fit.pca_projection, "h_pca_projection")], "pca")
    outputs = [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", dimension]),
               helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes]),
               helper.make_tensor_value_info("pca", TensorProto.FLOAT, ["N", fit.pca_projection.shape[1]])]
    outputs += [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["N"]) for name in HEAD_OUTPUTS]
    graph = helper.make_graph(
        b.nodes, "heads",
        [helper.make_tensor_value_info("features_in", TensorProto.FLOAT, ["N", dimension]),
         helper.make_tensor_value_info("logits_in", TensorProto.FLOAT, ["N", classes])],
        outputs, b.inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = ir_version
    onnx.checker.check_model(model)
    return model


def features_front(fit: HeadsFit, opset: int, ir_version: int) -> onnx.ModelProto:
    """x (N, D) features -> features_out, logits_out = x W^T + b: what lets a client that already has the features score
    them through the same heads (the companion vector bundle)."""
    classes, dimension = fit.logit_weight.shape
    nodes = [helper.make_node("Identity", ["x"], ["features_out"]),
             helper.make_node("Gemm", ["x", "front_weight", "front_bias"], ["logits_out"], transB=1)]
    graph = helper.make_graph(
        nodes, "features_front", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", dimension])],
        [helper.make_tensor_value_info("features_out", TensorProto.FLOAT, ["N", dimension]),
         helper.make_tensor_value_info("logits_out", TensorProto.FLOAT, ["N", classes])],
        [numpy_helper.from_array(fit.logit_weight, "front_weight"), numpy_helper.from_array(fit.logit_bias, "front_bias")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = ir_version
    return model


def attach_flow(heads: onnx.ModelProto, flow: onnx.ModelProto) -> onnx.ModelProto:
    """Merge a tabular-flow density graph (input `x` (N, p), output `log_prob` (N,)) onto the heads' `pca` output:
    the result keeps every heads output and adds `flow_log_prob`."""
    flow = onnx.compose.add_prefix(flow, "flow/")
    for output in flow.graph.output:
        if output.name == "flow/log_prob":
            output.name = "flow_log_prob"
    for node in flow.graph.node:
        node.output[:] = ["flow_log_prob" if name == "flow/log_prob" else name for name in node.output]
    keep = [output.name for output in heads.graph.output] + ["flow_log_prob"]
    return onnx.compose.merge_models(heads, flow, io_map=[("pca", "flow/x")], outputs=keep)
