"""`oodserve fit` below 1,000 rows: K-fold cross-conformal bundles, served by the real app, replayed against their
stored arrays, and their false-positive rate over many refits (a slow test that could fail)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from oodserve.bundle.calibration import fold_name
from oodserve.config import Settings
from oodserve.engine import Engine
from oodserve.models.data import DataError, VectorSet, load_vectors
from oodserve.models.fit.cross_conformal import FOLDS, fold_rows
from oodserve.models.fit.vectors import fit_vectors
from oodserve.scoring.pipeline import FusionRule, compute_signals, fold_statistic
from oodserve.server.app import create_app


def blobs(rows: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, rows)
    return rng.normal(0.0, 1.0, (rows, 5)) + 3.0 * np.eye(5)[labels], labels


@pytest.fixture(scope="module")
def small_bundle(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray, np.ndarray]:
    features, labels = blobs(120)
    data = VectorSet(features, [f"x{i}" for i in range(5)], labels, ["a", "b", "c"], "blobs-120")
    result = fit_vectors(data, tmp_path_factory.mktemp("cc") / "small", name="small", minutes=0.1, seed=3)
    assert "cross-conformal, 5 folds over 120 rows" in dict(result.summary)["method"]
    assert "1/121" in dict(result.summary)["small data costs"]
    return result.bundle, features, labels


def test_a_small_labelled_set_becomes_a_cross_conformal_bundle_the_service_serves(
    small_bundle: tuple[Path, np.ndarray, np.ndarray],
) -> None:
    bundle, features, _ = small_bundle
    engine = Engine.load(bundle)
    calibration = engine.manifest.calibration
    assert calibration.method == "cross_conformal" and calibration.folds == FOLDS
    assert calibration.minimum_alpha == pytest.approx(1 / 121) and "CV+" in calibration.statement
    assert set(engine.manifest.models) == {fold_name("reference", fold) for fold in range(FOLDS)}  # no network below 200 rows
    assert engine.reported_signals == ("knn_distance", "knn_ratio", "lof", "gaussian_density", "class_gaussian_density")
    assert engine.manifest.fusion.method == "fisher" and "fixed before any data" in engine.manifest.fusion.reason
    assert engine.minimum_alpha == pytest.approx(1 / 121)
    far = features[:3] + 30.0
    with TestClient(create_app(Settings(bundle=bundle, warmup_batch_size=2))) as client:
        body = client.post("/v1/score", json={"instances": [*features[:3].tolist(), *far.tolist()]}).json()
        described = client.get("/v1/models/small").json()
        v2 = client.post("/v2/models/small/infer", json={"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 5],
                                                                       "data": features[0].tolist()}]}).json()
        too_small = client.post("/v1/score?alpha=0.005", json={"instances": [features[0].tolist()]})
        histograms = client.get("/v1/models/small/calibration").json()
    results = body["results"]
    assert [result["is_ood"] for result in results[3:]] == [True] * 3 and sum(result["is_ood"] for result in results[:3]) <= 1
    assert all(result["p_value"] == pytest.approx(1 / 121) and result["score"] == 120 for result in results[3:])
    assert set(results[0]["p_values"]) == set(engine.reported_signals)
    assert described["calibration"]["method"] == "cross_conformal" and described["minimum_alpha"] == pytest.approx(1 / 121)
    held_out_sizes = [signal["calibration_size"] for signal in described["signals"] if signal["name"].startswith("knn_distance.fold")]
    assert len(held_out_sizes) == FOLDS and sum(held_out_sizes) == 120  # every row held out once
    assert {output["name"] for output in v2["outputs"]} >= {"is_ood", "p_value", "knn_distance", "class_gaussian_density"}
    assert too_small.status_code == 422 and "alpha" in too_small.json()["error"]["message"]
    assert set(histograms["signals"]) == set(engine.reported_signals) and histograms["fused"]["size"] == 120


def test_replaying_every_fold_reproduces_its_stored_held_out_arrays_exactly(small_bundle: tuple[Path, np.ndarray, np.ndarray]) -> None:
    """Rebuild the folds, score each fold's own rows with that fold's served models and signals, and compare with the
    bundle's held-out arrays and fused statistics bit for bit; no row is in its own fold's training or standardising."""
    bundle, features, labels = small_bundle
    engine = Engine.load(bundle)
    calibration = engine.bundle.calibration
    folds = fold_rows(len(features), FOLDS, 3, labels)
    rule = FusionRule(engine.fusion.method, engine.fusion.signals)
    for fold, rows in enumerate(folds):
        assert np.intersect1d(rows.held_out, rows.train).size == 0 and np.isin(rows.early_stopping, rows.train).all()
        held_out = features[rows.held_out].astype(np.float32)
        signals = compute_signals(engine.signal_definitions, engine.runner.run(held_out), held_out.astype(np.float64))
        members = {name: fold_name(name, fold) for name in rule.signals}
        for member in members.values():
            np.testing.assert_array_equal(np.sort(signals[member]), calibration.held_out[member], err_msg=member)
        statistics = fold_statistic(rule, members, signals, calibration.per_signal)
        np.testing.assert_array_equal(np.sort(statistics), calibration.fused_by_fold[fold])
    assert sorted(np.concatenate([rows.held_out for rows in folds]).tolist()) == list(range(len(features)))


def test_thirty_rows_fit_and_twenty_nine_are_refused(tmp_path: Path) -> None:
    features, _ = blobs(30, seed=1)
    result = fit_vectors(VectorSet(features, [f"x{i}" for i in range(5)], None, None, "thirty"), tmp_path / "thirty", name="thirty",
                         minutes=0.05)
    assert result.manifest["calibration"]["minimum_alpha"] == pytest.approx(1 / 31)
    assert Engine.load(result.bundle).score(features[:2].astype(np.float32)).fused_p_value.min() >= 1 / 31
    np.save(tmp_path / "few.npy", features[:29])
    with pytest.raises(DataError, match="29 rows; oodserve fit needs at least 30"):
        load_vectors(tmp_path / "few.npy")
    with pytest.raises(ValueError, match="conditional needs split calibration"):
        fit_vectors(VectorSet(features, [f"x{i}" for i in range(5)], None, None, "thirty"), tmp_path / "never", name="never",
                    minutes=0.05, delta=0.1)


@pytest.mark.slow
def test_the_cross_conformal_false_positive_rate_over_many_refits_is_at_most_alpha(tmp_path: Path) -> None:
    """60 rows of a Gaussian mixture, refitted on 100 fresh draws; each bundle's verdicts on 4,000 fresh inliers. The
    mean FPR at alpha 0.1 over the draws must not sit significantly above alpha (CV+ allows up to ~2 alpha in the
    worst case; the product claims about alpha)."""
    rng = np.random.default_rng(7)
    centres = rng.normal(0.0, 3.0, (3, 4))

    def draw(count: int) -> np.ndarray:
        return centres[rng.integers(0, 3, count)] + rng.normal(size=(count, 4))

    alpha, rates = 0.1, []
    for index in range(100):
        result = fit_vectors(VectorSet(draw(60), [f"x{i}" for i in range(4)], None, None, "mix"), tmp_path / "mix", name="mix",
                             minutes=0.02, seed=index)
        rates.append(float(np.mean(Engine.load(result.bundle).score(draw(4000).astype(np.float32)).fused_p_value < alpha)))
    mean, half = float(np.mean(rates)), 1.96 * float(np.std(rates, ddof=1)) / np.sqrt(len(rates))
    assert mean - half <= alpha, f"mean FPR {mean:.4f} +- {half:.4f} over {len(rates)} refits at alpha {alpha}"


def test_the_cli_refuses_a_conditional_guarantee_on_a_small_table_and_an_unknown_guarantee(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from oodserve.cli import app

    features, _ = blobs(60, seed=2)
    np.save(tmp_path / "rows.npy", features)
    small = CliRunner().invoke(app, ["fit", str(tmp_path / "rows.npy"), "--out", str(tmp_path / "b"), "--guarantee", "conditional"])
    assert small.exit_code == 2 and "needs split calibration" in small.output and not (tmp_path / "b").exists()
    unknown = CliRunner().invoke(app, ["fit", str(tmp_path / "rows.npy"), "--out", str(tmp_path / "b"), "--guarantee", "always"])
    assert unknown.exit_code == 2 and "--guarantee must be marginal or conditional" in unknown.output
