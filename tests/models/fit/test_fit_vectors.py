"""`oodserve fit` on feature vectors: tiny bundles fitted in seconds from every vector format, labelled and
not, served by the real app; bad data refused with a message naming the file, rows or columns. Sets of 1,000 rows and
more are calibrated on separate splits (here with the calibration-conditional guarantee), smaller ones cross-conformally
(tests/models/fit/test_cross_conformal.py)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from oodserve.cli import app as cli_app
from oodserve.config import Settings
from oodserve.engine import Engine
from oodserve.models.data import DataError, load_vectors
from oodserve.models.fit.budget import Budget
from oodserve.models.fit.run import FitSettings, fit
from oodserve.models.splits import fit_split, split_sizes
from oodserve.server.app import create_app

ROWS, FEATURES = 400, 6
SPLIT_ROWS = 1200


def blobs(rows: int = ROWS, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Three Gaussian classes in 6 dimensions (the last feature constant), labels 0..2."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, rows)
    features = rng.normal(0.0, 1.0, (rows, FEATURES)) + 3.0 * np.eye(FEATURES)[labels]
    features[:, -1] = 7.0
    return features, labels


@pytest.fixture(scope="module")
def labelled_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("fit")
    features, labels = blobs(SPLIT_ROWS)
    np.savez(directory / "blobs.npz", x=features, y=labels)
    result = fit(FitSettings(data=directory / "blobs.npz", out=directory / "blobs-bundle", minutes=0.15, seed=1, delta=0.1))
    return result.bundle


def test_a_labelled_npz_fits_into_a_bundle_the_service_serves(labelled_bundle: Path) -> None:
    manifest = json.loads((labelled_bundle / "manifest.json").read_text())
    assert manifest["input"] == {"shape": [FEATURES], "dtype": "float32", "min": -3e38, "max": 3e38, "layout": "features",
                                 "features": [f"x{i}" for i in range(FEATURES)]}
    assert manifest["labels"] == ["0", "1", "2"] and manifest["classifier"] == {"model": "sngp", "logits": "logits"}
    assert set(manifest["models"]) == {"reference", "flow", "sngp"}
    assert manifest["calibration"]["method"] == "split" and manifest["calibration"]["guarantee"] == "conditional"
    assert manifest["provenance"]["constant_columns_dropped"] == [f"x{FEATURES - 1}"]
    assert manifest["provenance"]["minimum_alpha"] == pytest.approx(1 / (manifest["provenance"]["splits"]["fusion_calibration"] + 1))
    features, _ = blobs(seed=5)
    far = features[:4] + 25.0
    with TestClient(create_app(Settings(bundle=labelled_bundle, warmup_batch_size=2))) as client:
        body = client.post("/v1/score", json={"instances": [*features[:4].tolist(), *far.tolist()]}).json()
        described = client.get("/v1/models/blobs-bundle").json()
        refused = client.post("/v1/score", json={"instances": [[1.0, 2.0]]})
        npy_ok = client.post("/v1/score", content=_npy(features[:3].astype(np.float32)), headers={"content-type": "application/x-npy"})
        v2 = client.get("/v2/models/blobs-bundle").json()
    verdicts = [result["is_ood"] for result in body["results"]]
    assert verdicts[4:] == [True] * 4 and sum(verdicts[:4]) <= 1
    assert all("prediction" in result for result in body["results"])
    assert described["input"]["features"][0] == "x0" and described["accepted_instance_shapes"] == [[FEATURES]]
    assert refused.status_code == 422 and f"[{FEATURES}]" in refused.json()["error"]["message"]
    assert npy_ok.status_code == 200 and len(npy_ok.json()["results"]) == 3
    assert v2["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, FEATURES]}]
    assert v2["parameters"]["feature_names"].startswith("x0,x1")


def test_replaying_the_calibration_rows_through_the_served_engine_gives_the_stored_arrays_exactly(labelled_bundle: Path) -> None:
    """The leak check of issue 30: rebuild the fit's split, score its calibration rows as a client would (float32,
    through the engine) and compare with calibration.npz bit for bit; and the conditional p-value is the band's."""
    features, labels = blobs(SPLIT_ROWS)
    split = fit_split(SPLIT_ROWS, 1, labels)
    engine = Engine.load(labelled_bundle)
    calibration = engine.bundle.calibration
    signal_rows = engine.score(features[split.signal_calibration].astype(np.float32))
    for name, stored in calibration.per_signal.items():
        np.testing.assert_array_equal(np.sort(signal_rows.signals[name]), stored, err_msg=name)
    fusion_rows = engine.score(features[split.fusion_calibration].astype(np.float32))
    np.testing.assert_array_equal(np.sort(fusion_rows.fused_score), calibration.fused)
    assert calibration.conditional is not None
    counts = len(calibration.fused) - np.searchsorted(calibration.fused, fusion_rows.fused_score, side="left")
    np.testing.assert_array_equal(fusion_rows.fused_p_value, calibration.conditional[counts])
    assert engine.minimum_alpha == calibration.conditional[0] > 1.0 / (len(calibration.fused) + 1)
    no_overlap = np.intersect1d(np.concatenate([split.train, split.validation]), split.calibration)
    assert no_overlap.size == 0


def _npy(array: np.ndarray) -> bytes:
    import io

    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def test_a_csv_with_a_label_column_and_an_unlabelled_fit_from_the_cli(tmp_path: Path) -> None:
    features, labels = blobs()
    header = ",".join([*(f"f{i}" for i in range(FEATURES)), "kind"])
    rows = [",".join([*(f"{value:.6f}" for value in row), ["cat", "dog", "eel"][label]]) for row, label in zip(features, labels)]
    (tmp_path / "table.csv").write_text("\n".join([header, *rows]) + "\n")
    result = CliRunner().invoke(cli_app, ["fit", str(tmp_path / "table.csv"), "--out", str(tmp_path / "csv-bundle"),
                                          "--label-column", "kind", "--minutes", "0.1"])
    assert result.exit_code == 0, result.output
    assert "3 classes" in result.output and "minimum supported" in result.output and "fusion" in result.output
    assert "cross-conformal, 5 folds over 400 rows" in result.output and "small data costs" in result.output
    manifest = json.loads((tmp_path / "csv-bundle" / "manifest.json").read_text())
    assert manifest["labels"] == ["cat", "dog", "eel"] and manifest["input"]["features"] == [f"f{i}" for i in range(FEATURES)]
    np.save(tmp_path / "plain.npy", features)
    unlabelled = fit(FitSettings(data=tmp_path / "plain.npy", out=tmp_path / "plain-bundle", minutes=0.1, labels="none"))
    assert unlabelled.manifest["classifier"] is None and not any(model.startswith("sngp") for model in unlabelled.manifest["models"])
    with TestClient(create_app(Settings(bundle=unlabelled.bundle, warmup_batch_size=2))) as client:
        answer = client.post("/v1/score", json={"instances": [features[0].tolist()]}).json()
    assert "prediction" not in answer["results"][0]


def test_parquet_vectors_load_with_their_column_names_and_labels(tmp_path: Path) -> None:
    import pyarrow as pa
    from pyarrow import parquet

    features, labels = blobs()
    columns = {f"feature {i}": features[:, i] for i in range(FEATURES)}
    parquet.write_table(pa.table({**columns, "class": [f"c{label}" for label in labels]}), tmp_path / "rows.parquet")
    loaded = load_vectors(tmp_path / "rows.parquet", label_column="class")
    assert loaded.feature_names == list(columns) and loaded.class_names == ["c0", "c1", "c2"]
    np.testing.assert_allclose(loaded.features, features)
    assert (loaded.labels == labels).all()
    with pytest.raises(DataError, match=r"columns \['class'\] are not numeric; name the label column"):
        load_vectors(tmp_path / "rows.parquet")


def test_a_second_fit_with_the_same_work_directory_reuses_the_trained_models(tmp_path: Path) -> None:
    features, _ = blobs(SPLIT_ROWS)
    np.save(tmp_path / "data.npy", features)
    settings = FitSettings(data=tmp_path / "data.npy", out=tmp_path / "bundle", minutes=0.1, work=tmp_path / "work")
    first = fit(settings)
    second = fit(settings)
    assert first.manifest["provenance"]["training"]["flow"] == second.manifest["provenance"]["training"]["flow"]
    assert (tmp_path / "work" / "flow.done").exists()


@pytest.mark.parametrize(
    ("write", "message"),
    [
        (lambda path: np.save(path / "d.npy", np.where(np.eye(300, 4, dtype=bool), np.nan, 1.0)), "non-finite cells"),
        (lambda path: np.save(path / "d.npy", np.ones((29, 4))), "29 rows; oodserve fit needs at least 30"),
        (lambda path: np.save(path / "d.npy", np.ones((300, 2))[:, :, None]), "2-D array"),
        (lambda path: (path / "d.csv").write_text("a,b,name\n" + "1,2,x\n" * 300), "['name'] are not numeric"),
        (lambda path: (path / "d.csv").write_text("a,b\n1,2\n3\n"), "cannot be read as CSV"),
        (lambda path: np.savez(path / "d.npz", features=np.ones((300, 3))), "array named `x`"),
    ],
)
def test_bad_data_is_refused_naming_the_file_and_what_is_wrong(tmp_path: Path, write, message: str) -> None:
    write(tmp_path)
    (path,) = list(tmp_path.iterdir())
    with pytest.raises(DataError) as refused:
        load_vectors(path)
    assert str(path) in str(refused.value) and message in str(refused.value)
    result = CliRunner().invoke(cli_app, ["fit", str(path), "--out", str(tmp_path / "never")])
    assert result.exit_code == 2 and str(path) in result.output and not (tmp_path / "never").exists()


def test_labels_with_a_class_too_small_to_learn_are_set_aside_and_the_fit_goes_on_label_free(tmp_path: Path,
                                                                                             caplog: pytest.LogCaptureFixture) -> None:
    np.savez(tmp_path / "d.npz", x=np.random.default_rng(0).normal(size=(300, 3)), y=np.r_[np.zeros(297), np.ones(3)])
    loaded = load_vectors(tmp_path / "d.npz")
    assert loaded.labels is None and loaded.class_names is None
    assert "fewer than 5 examples" in caplog.text and "fitting without labels" in caplog.text


def test_nan_rows_and_columns_are_named(tmp_path: Path) -> None:
    features = np.ones((300, 3))
    features[[4, 17], 1] = np.nan
    np.save(tmp_path / "holes.npy", features)
    with pytest.raises(DataError, match=r"2 rows \(first rows \[4, 17\]\), columns \['x1'\]"):
        load_vectors(tmp_path / "holes.npy")


def test_splits_are_disjoint_stratified_and_sized_to_the_data() -> None:
    labels = np.repeat([0, 1, 2], [600, 300, 100])
    split = fit_split(len(labels), seed=3, labels=labels)
    parts = [split.train, split.validation, split.signal_calibration, split.fusion_calibration]
    assert sum(len(part) for part in parts) == len(labels) and len(np.unique(np.concatenate(parts))) == len(labels)
    assert split_sizes(1000) == (100, 150, 150) and split_sizes(200) == (20, 30, 30) and split_sizes(100_000)[1] == 5000
    for part in parts[1:]:
        shares = np.bincount(labels[part], minlength=3) / len(part)
        np.testing.assert_allclose(shares, [0.6, 0.3, 0.1], atol=0.05)


def test_a_stage_that_stops_early_hands_its_time_to_the_next() -> None:

    budget = Budget(1000.0, reserve_fraction=0.2, started=time.monotonic())
    budget.plan({"flow": 0.5, "sngp": 0.5})
    assert budget.seconds_for("flow") == pytest.approx(400.0, abs=1.0) and budget.seconds_for("sngp") == pytest.approx(400.0, abs=1.0)
    budget.record("flow", 100.0)
    budget.started -= 100.0  # the flow stopped after 100 of its 400 seconds
    budget.plan({"sngp": 0.5}, keep=budget.planned)
    assert budget.seconds_for("sngp") == pytest.approx(700.0, abs=1.0)
    assert budget.planned["flow"] == pytest.approx(400.0, abs=1.0)
