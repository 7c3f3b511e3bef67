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
    standardized, distance, ratio, lof = session.run(None, {"x": queries})
    expected = vector_reference_outputs(reference, queries.astype(np.float64))
    np.testing.assert_allclose(standardized, expected["standardized"], atol=1e-12)
    np.testing.assert_allclose(distance, expected["knn_distance"], atol=1e-9)
    np.testing.assert_allclose(ratio, expected["knn_ratio"], atol=1e-9)
    np.testing.assert_allclose(lof, expected["lof"], rtol=1e-9)
    np.testing.assert_allclose(distance[:5], distance[5:10])  # the constant column is not used
    assert np.median(expected["knn_ratio"][:5]) < 2.0 and ratio[10:].min() > ratio[:5].max()


def test_the_local_outlier_factor_is_scikit_learns_and_leaves_each_reference_row_out_of_its_own_neighbours() -> None:
    """Breunig et al. 2000, as scikit-learn's LocalOutlierFactor(n_neighbors=20, novelty=True) computes it on the same
    bounded standardised rows; for the reference rows themselves, the training LOF (each row not its own neighbour)."""
    from sklearn.neighbors import LocalOutlierFactor

    from oodserve.models.closed_form import bounded_features, vector_reference_leave_one_out

    rng = np.random.default_rng(1)
    data = np.concatenate([rng.normal(size=(300, 3)), rng.normal(4.0, 0.3, size=(100, 3))])
    reference = fit_vector_reference(data, np.arange(3), max_reference=1000, k=5, rng=rng)
    queries = np.concatenate([rng.normal(size=(20, 3)), rng.normal(4.0, 0.3, size=(20, 3)), rng.normal(2.0, 3.0, size=(20, 3))])
    peer = LocalOutlierFactor(n_neighbors=20, novelty=True).fit(reference.reference)
    expected = -peer.score_samples(bounded_features((queries - reference.mean) / reference.scale, reference.bound))
    np.testing.assert_allclose(vector_reference_outputs(reference, queries)["lof"], expected, rtol=1e-6)
    np.testing.assert_allclose(vector_reference_leave_one_out(reference)["lof"], -peer.negative_outlier_factor_, rtol=1e-6)
