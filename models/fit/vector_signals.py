"""The signals of a vector bundle and the constants every vector fit shares (split or cross-conformal)."""

from __future__ import annotations

import numpy as np

from oodserve.models.build.signals import SignalPlan

FLOAT32_LIMIT = 3.0e38
"""Vector inputs are refused only when not finite (or beyond float32): OOD rows must be scored, not refused."""
KNN_NEIGHBOURS = 5
MAX_REFERENCE_ROWS = 5000


def constant_columns(features: np.ndarray) -> np.ndarray:
    """Indices of the columns of `features` (N, D) that take one value only."""
    return np.flatnonzero(np.ptp(features, axis=0) == 0)


def vector_signal_plans(has_flow: bool, has_classifier: bool) -> list[SignalPlan]:
    """The signals of a vector bundle (each kind's `fit` learns its parameters on the training split)."""
    plans = [
        SignalPlan("knn_distance", "model_output", "reference", "knn_distance", {"sign": 1.0}),
        SignalPlan("knn_ratio", "model_output", "reference", "knn_ratio", {"sign": 1.0}),
        SignalPlan("lof", "model_output", "reference", "lof", {"sign": 1.0}),
        SignalPlan("gaussian_density", "feature_density", "reference", "standardized",
                   {"parameters_file": "gaussian.npz", "class_conditional": False}),
    ]
    if has_flow:
        plans += [
            SignalPlan("flow_nll", "model_output", "flow", "log_prob", {"sign": -1.0}),
            SignalPlan("flow_typicality", "model_output", "flow", "log_prob", {"two_sided": True}),
        ]
    if has_classifier:
        plans += [
            SignalPlan("class_gaussian_density", "feature_density", "reference", "standardized",
                       {"parameters_file": "class_gaussians.npz"}),
            SignalPlan("sngp_variance", "model_output", "sngp", "variance", {"sign": 1.0}),
            SignalPlan("sngp_max_softmax", "max_softmax", "sngp", "logits"),
            SignalPlan("sngp_feature_density", "feature_density", "sngp", "features", {"parameters_file": "sngp_feature_density.npz"}),
        ]
    return plans
