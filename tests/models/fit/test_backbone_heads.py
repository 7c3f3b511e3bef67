"""Feature-space heads: the ONNX graph of every head against its numpy reference (and the flow against torch), and
checks that each head grows with distance from the training features."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from sklearn.metrics import roc_auc_score

from oodserve.models.fit.backbone_heads import HEAD_OUTPUTS, attach_flow, fit_heads, heads_model, knn_neighbours, score_heads
from oodserve.models.flows.tabular import export_tabular_flow, train_tabular_flow


def _data(seed: int = 0, count: int = 600, dimension: int = 12, classes: int = 4) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 3, (classes, dimension))
    labels = rng.integers(0, classes, count)
    features = centres[labels] + rng.normal(0, 1, (count, dimension))
    weight = rng.normal(0, 1, (classes, dimension))
    logits = features @ weight.T + rng.normal(0, 0.1, classes)
    return features.astype(np.float32), logits.astype(np.float32), labels, weight


def _session(model: object) -> ort.InferenceSession:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])  # type: ignore[attr-defined]


def test_every_head_onnx_matches_numpy() -> None:
    features, logits, labels, _ = _data()
    fit = fit_heads(features, logits, labels, gp_features=64)
    session = _session(heads_model(fit, features.shape[1], logits.shape[1], 17, 8))
    test_features, test_logits, _, _ = _data(seed=1, count=50)
    test_features[:5] *= 4.0  # far points too
    names = [*HEAD_OUTPUTS, "pca", "features", "logits"]
    served = dict(zip(names, session.run(names, {"features_in": test_features, "logits_in": test_logits})))
    reference = score_heads(fit, test_features, test_logits)
    for name in [*HEAD_OUTPUTS, "pca"]:
        scale = float(np.abs(reference[name]).max()) + 1e-6
        np.testing.assert_allclose(served[name], reference[name], rtol=2e-4, atol=2e-4 * scale, err_msg=name)
    np.testing.assert_array_equal(served["features"], test_features)


def test_flow_head_matches_torch(tmp_path: Path) -> None:
    features, logits, labels, _ = _data()
    fit = fit_heads(features, logits, labels, gp_features=32)
    pca = score_heads(fit, features, logits)["pca"].astype(np.float32)
    order = np.random.default_rng(0).permutation(len(pca))
    flow = train_tabular_flow(pca[order[200:]], pca[order[:200]], 1.0, seed=0).flow
    dimension = pca.shape[1]
    path = export_tabular_flow(flow, np.arange(dimension), np.zeros(dimension), np.ones(dimension), dimension, tmp_path / "flow.onnx")
    session = _session(attach_flow(heads_model(fit, features.shape[1], logits.shape[1], 17, 8), onnx.load(str(path))))
    feeds = {"features_in": features[:40], "logits_in": logits[:40]}
    onnx_log_prob, onnx_pca, knn = session.run(["flow_log_prob", "pca", "knn_distance"], feeds)
    with torch.no_grad():
        torch_log_prob = flow.log_prob(torch.as_tensor(pca[:40])).numpy()
    np.testing.assert_allclose(onnx_pca, pca[:40], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(onnx_log_prob, torch_log_prob, rtol=1e-4, atol=1e-3)
    assert knn.shape == (40,)  # the other heads survive the merge


def test_vim_origin_is_exact_for_a_linear_head() -> None:
    features, logits, labels, weight = _data()
    fit = fit_heads(features, logits, labels, gp_features=16)
    assert fit.figures["logit_map_residual"] < 1e-3  # the logits are an affine map of the features: least squares recovers it


@pytest.mark.parametrize("head", ["knn_distance", "mahalanobis", "relative_mahalanobis", "vim", "gp_variance"])
def test_distance_heads_rank_far_points_above_training_like_points(head: str) -> None:
    everything, all_logits, all_labels, weight = _data(count=1800)
    features, logits, labels = everything[:1500], all_logits[:1500], all_labels[:1500]
    fit = fit_heads(features, logits, labels, gp_features=128)
    near, near_logits = everything[1500:], all_logits[1500:]  # unseen points of the same distribution
    rng = np.random.default_rng(3)
    far = rng.normal(0, 8, near.shape).astype(np.float32)  # random directions, off every class centre
    far_logits = far @ weight.T
    inside = score_heads(fit, near, near_logits)[head]
    outside = score_heads(fit, far, far_logits)[head]
    area = roc_auc_score(np.r_[np.zeros(len(inside)), np.ones(len(outside))], np.r_[inside, outside])
    assert area > 0.95, f"{head}: AUROC {area:.3f}"


def test_knn_neighbours_follow_sun_et_al() -> None:
    assert knn_neighbours(50000) == 50 and knn_neighbours(5000) == 5 and knn_neighbours(10) == 1
