"""The closed-form vector reference graph (standardisation, k-NN distance and ratio) against its numpy
reference, and the ratio's meaning: about 1 inside the data, larger in sparse places."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

from oodserve.models.closed_form import fit_vector_reference, vector_reference_model, vector_reference_outputs


def test_reference_graph_matches_numpy_and_drops_constant_columns() -> None:
    rng = np.random.default_rng(0)
    data = rng.normal(size=(400, 5)) * [1.0, 2.0, 3.0, 4.0, 0.0] + [0.0, 1.0, 2.0, 3.0, 7.0]
    reference = fit_vector_reference(data, np.arange(4), max_reference=300, k=5, rng=rng)
    session = ort.InferenceSession(vector_reference_model(reference, 5).SerializeToString(), providers=["CPUExecutionProvider"])
    queries = np.concatenate([data[:5], data[:5] + [0, 0, 0, 0, 100.0], data[:5] * 6.0]).astype(np.float32)
    standardized, distance, ratio = session.run(None, {"x": queries})
    expected = vector_reference_outputs(reference, queries.astype(np.float64))
    np.testing.assert_allclose(standardized, expected["standardized"], atol=1e-12)
    np.testing.assert_allclose(distance, expected["knn_distance"], atol=1e-9)
    np.testing.assert_allclose(ratio, expected["knn_ratio"], atol=1e-9)
    np.testing.assert_allclose(distance[:5], distance[5:10])  # the constant column is not used
    assert np.median(expected["knn_ratio"][:5]) < 2.0 and ratio[10:].min() > ratio[:5].max()
