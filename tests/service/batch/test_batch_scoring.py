"""`oodserve score` on Ray Data: the server's verdicts bit for bit (vector and image bundles, CSV, Parquet, .npy
and image folders), bad rows and missing columns refused by name, 200,000 rows through bounded memory, two
actors equal one, drift over the stored order, the Python API. One local Ray is shared by the whole module."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
import typer
from fastapi.testclient import TestClient
from PIL import Image
from typer.testing import CliRunner

from oodserve.batch import BadRowError, BatchOptions, Payload, SourceError, score_dataset, score_file, score_frame
from oodserve.batch import run as batch_run
from oodserve.batch.memory import PeakMemory, process_rss, process_tree_memory
from oodserve.cli import app as cli_app
from oodserve.cli import optional
from oodserve.models.fit.run import FitSettings, fit
from oodserve.runtime.sessions import RuntimeOptions
from oodserve.server.app import create_app
from tests.helpers.backbones import coloured_images
from tests.helpers.bundles import build_bundle, make_models, make_settings, sample_images

pytestmark = pytest.mark.slow

FEATURES = [f"x{i}" for i in range(6)]


@pytest.fixture(scope="module", autouse=True)
def local_ray() -> Iterator[None]:
    """One small local Ray for the module (score_file uses an initialised Ray as it is)."""
    ray.init(num_cpus=3, include_dashboard=False, object_store_memory=150 << 20, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def vector_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:

    directory = tmp_path_factory.mktemp("vectors")
    rng = np.random.default_rng(0)
    np.savez(directory / "train.npz", x=rng.normal(0.0, 1.0, (400, len(FEATURES))))
    return fit(FitSettings(data=directory / "train.npz", out=directory / "bundle", minutes=0.05, seed=1)).bundle


@pytest.fixture(scope="module")
def image_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_bundle(tmp_path_factory.mktemp("images") / "bundle")


def vector_rows(count: int, seed: int) -> np.ndarray:
    """In-distribution rows, the last fifth shifted far away (clear OOD)."""
    rows = np.random.default_rng(seed).normal(0.0, 1.0, (count, len(FEATURES)))
    rows[-count // 5 :] += 8.0
    return rows


def http_results(bundle: Path, body: Any, npy: bool = False, chunk: int = 16) -> list[dict[str, Any]]:
    """The HTTP API's results for the rows of `body`, sent `chunk` rows per request."""
    results: list[dict[str, Any]] = []
    with TestClient(create_app(make_settings(bundle, max_body_bytes=4_000_000))) as client:
        for start in range(0, len(body), chunk):
            part = body[start : start + chunk]
            if npy:
                buffer = io.BytesIO()
                np.save(buffer, part)
                response = client.post("/v1/score", content=buffer.getvalue(), headers={"content-type": "application/x-npy"})
            else:
                response = client.post("/v1/score", json={"instances": part.tolist()})
            assert response.status_code == 200, response.text
            results.extend(response.json()["results"])
    return results


def assert_same_as_http(table: pd.DataFrame, served: list[dict[str, Any]]) -> None:
    """Every verdict, fused score and p-value equal, bit for bit (floats compared with ==, not approx).

    Raw signal values are compared to 1e-6 (relative): they come from float32 model outputs, and onnxruntime's
    kernels may round the last float32 bit differently for another batch size (the server's own merged batches do
    the same), while the requests here are cut differently from the batches; the conformal p-values, counts
    against the calibration, do not move."""
    assert len(table) == len(served)
    for row, result in zip(table.to_dict("records"), served):
        assert row["is_ood"] == result["is_ood"]
        assert row["p_value"] == result["p_value"] and row["score"] == result["score"]
        for name, value in result["p_values"].items():
            assert row[f"p_value_{name}"] == value, name
            assert row[f"signal_{name}"] == pytest.approx(result["signals"][name], rel=1e-6, abs=1e-9), name
        if "prediction" in result:
            assert (row["class_index"], row["label"]) == (result["prediction"]["class_index"], result["prediction"]["label"])
            assert row["confidence"] == result["prediction"]["confidence"]


def test_vector_csv_and_parquet_verdicts_equal_the_http_api(vector_bundle: Path, tmp_path: Path) -> None:
    rows = vector_rows(300, seed=3)
    frame = pd.DataFrame(rows, columns=FEATURES)
    frame.insert(0, "id", [f"r{i}" for i in range(len(rows))])
    frame.to_csv(tmp_path / "rows.csv", index=False, float_format="%.17g")
    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), tmp_path / "rows.parquet", row_group_size=70)
    served = http_results(vector_bundle, rows.astype(np.float32))
    for name in ("rows.csv", "rows.parquet"):
        summary = score_file(tmp_path / name, vector_bundle, tmp_path / f"{name}.out.parquet", BatchOptions(batch_size=100))
        table = pq.read_table(tmp_path / f"{name}.out.parquet").to_pandas()
        assert table["id"].tolist() == frame["id"].tolist() and table["row"].tolist() == list(range(300))
        assert_same_as_http(table, served)
        assert (summary.rows, summary.scored, summary.bad_rows) == (300, 300, 0)
        assert summary.ood == int(table["is_ood"].sum()) and summary.ood >= 60  # the 60 far rows at least
        low, high = summary.interval or (0.0, 0.0)
        assert low < summary.ood / 300 < high


def test_image_folder_and_npy_verdicts_equal_the_http_api(image_bundle: Path, tmp_path: Path) -> None:
    images = sample_images(make_models(0), 50, seed=11)
    images[40:] = 255 - images[40:]  # inverted: far from the density
    folder = tmp_path / "images"
    folder.mkdir()
    for index, image in enumerate(images):
        Image.fromarray(image.reshape(28, 28)).save(folder / f"{index:03d}.png")
    np.save(tmp_path / "images.npy", images)
    served = http_results(image_bundle, images, npy=True, chunk=8)
    for source in (folder, tmp_path / "images.npy"):
        score_file(source, image_bundle, tmp_path / "out.parquet", BatchOptions(batch_size=20))
        table = pq.read_table(tmp_path / "out.parquet").to_pandas()
        assert_same_as_http(table, served)
    assert table["label"].str.startswith("class-").all()
    assert pq.read_table(tmp_path / "out.parquet").column("source").to_pylist()[0].endswith("images.npy")


def test_backbone_bundle_image_folder_equals_the_http_api(tmp_path: Path) -> None:
    """Backbone bundles (the user's classifier as the feature extractor) take images as image bundles do."""
    pytest.importorskip("oodserve.models.fit.backbone")
    backbone_bundles = pytest.importorskip("tests.helpers.backbone_bundles")

    bundle = backbone_bundles.tiny_backbone_bundle(tmp_path / "backbone")
    images = coloured_images(30, seed=5)[0].transpose(0, 2, 3, 1)  # (N, H, W, 3) uint8
    folder = tmp_path / "images"
    folder.mkdir()
    for index, image in enumerate(images):
        Image.fromarray(image).save(folder / f"{index:03d}.png")
    score_file(folder, bundle, tmp_path / "out.parquet", BatchOptions(batch_size=12))
    assert_same_as_http(pq.read_table(tmp_path / "out.parquet").to_pandas(), http_results(bundle, images, npy=True, chunk=8))


def test_a_parquet_column_of_encoded_images(image_bundle: Path, tmp_path: Path) -> None:
    images = sample_images(make_models(0), 12, seed=12)
    encoded = []
    for image in images:
        buffer = io.BytesIO()
        Image.fromarray(image.reshape(28, 28)).save(buffer, format="PNG")
        encoded.append(buffer.getvalue())
    encoded[5] = b"not an image"
    pq.write_table(pa.table({"png": encoded}), tmp_path / "encoded.parquet")
    summary = score_file(tmp_path / "encoded.parquet", image_bundle, tmp_path / "out.parquet",
                         BatchOptions(image_column="png", batch_size=5))
    table = pq.read_table(tmp_path / "out.parquet").to_pandas()
    assert (summary.scored, summary.bad_rows) == (11, 1) and summary.bad_examples[0]["row"] == 5
    assert table["error"][5].startswith("malformed_png") and pd.isna(table["p_value"][5])
    assert_same_as_http(table.drop(index=5), http_results(image_bundle, np.delete(images, 5, axis=0), npy=True))


def test_a_folder_of_tables_is_read_in_path_order_with_rows_per_file(vector_bundle: Path, tmp_path: Path) -> None:
    folder = tmp_path / "tables"
    (folder / "part=2").mkdir(parents=True)
    rows = vector_rows(30, seed=10)
    pd.DataFrame(rows[:12], columns=FEATURES).to_csv(folder / "a.csv", index=False, float_format="%.17g")
    pd.DataFrame(rows[12:], columns=FEATURES).to_parquet(folder / "part=2" / "b.parquet")
    summary = score_file(folder, vector_bundle, tmp_path / "out.parquet", BatchOptions(batch_size=7))
    table = pq.read_table(tmp_path / "out.parquet").to_pandas()
    assert summary.rows == 30 and [Path(source).name for source in table["source"]] == ["a.csv"] * 12 + ["b.parquet"] * 18
    assert table["row"].tolist() == [*range(12), *range(18)]
    assert_same_as_http(table, http_results(vector_bundle, rows.astype(np.float32)))
    Image.fromarray(np.zeros((28, 28), dtype=np.uint8)).save(folder / "stray.png")
    with pytest.raises(SourceError, match="holds both tables"):
        score_file(folder, vector_bundle, tmp_path / "out.parquet")


def test_bad_rows_are_reported_by_index_skipped_or_refused(vector_bundle: Path, tmp_path: Path) -> None:
    rows = vector_rows(40, seed=4)
    lines = [",".join(FEATURES)] + [",".join(f"{value:.17g}" for value in row) for row in rows]
    lines[1 + 7] = lines[1 + 7].replace(lines[1 + 7].split(",")[2], "abc", 1)
    lines[1 + 12] = ",".join(["", *lines[1 + 12].split(",")[1:]])
    lines[1 + 30] = ",".join(["nan", *lines[1 + 30].split(",")[1:]])
    (tmp_path / "bad.csv").write_text("\n".join(lines) + "\n")
    summary = score_file(tmp_path / "bad.csv", vector_bundle, tmp_path / "out.parquet")
    assert summary.bad_rows == 3 and [example["row"] for example in summary.bad_examples] == [7, 12, 30]
    errors = pq.read_table(tmp_path / "out.parquet").column("error").to_pylist()
    assert "'abc', not a number" in errors[7] and "missing value in column 'x0'" in errors[12]
    assert errors[30].startswith("invalid_value") and "nan" in errors[30]
    assert sum(error is not None for error in errors) == 3 and summary.scored == 37
    with pytest.raises(BadRowError, match=r"row 7 of .*bad.csv: invalid_value"):
        score_file(tmp_path / "bad.csv", vector_bundle, tmp_path / "refused.parquet", BatchOptions(on_bad_row="fail"))
    assert not (tmp_path / "refused.parquet").exists()
    result = CliRunner().invoke(cli_app, ["score", str(tmp_path / "bad.csv"), "--bundle", str(vector_bundle), "--out",
                                          str(tmp_path / "cli.parquet"), "--on-bad-row", "fail", "--no-progress"])
    assert result.exit_code == 2 and "row 7 of" in result.output


def test_missing_and_extra_columns_are_named(vector_bundle: Path, tmp_path: Path) -> None:
    frame = pd.DataFrame(vector_rows(10, seed=5), columns=FEATURES).drop(columns=["x3"]).assign(colour="red")
    frame.to_parquet(tmp_path / "wrong.parquet")
    with pytest.raises(SourceError, match=r"missing column \['x3'\] and extra column \['colour'\]"):
        score_file(tmp_path / "wrong.parquet", vector_bundle, tmp_path / "out.parquet")
    frame.assign(x3=0.0).to_csv(tmp_path / "extra.csv", index=False)
    result = CliRunner().invoke(cli_app, ["score", str(tmp_path / "extra.csv"), "--bundle", str(vector_bundle), "--out",
                                          str(tmp_path / "out.parquet"), "--no-progress"])
    assert result.exit_code == 2 and "extra column ['colour']" in result.output and "--allow-extra-columns" in result.output
    assert score_file(tmp_path / "extra.csv", vector_bundle, tmp_path / "out.parquet", BatchOptions(allow_extra_columns=True)).scored == 10


def test_200000_rows_stream_through_bounded_memory(vector_bundle: Path, tmp_path: Path) -> None:
    rows = vector_rows(200_000, seed=6).astype(np.float32)
    pq.write_table(pa.table({name: rows[:, index] for index, name in enumerate(FEATURES)}), tmp_path / "big.parquet",
                   row_group_size=25_000)
    driver_before, tree_before = process_rss(), process_tree_memory()
    with PeakMemory() as peak:
        summary = score_file(tmp_path / "big.parquet", vector_bundle, tmp_path / "out.parquet", BatchOptions(batch_size=8192))
    driver_growth = process_rss() - driver_before
    print(f"200,000 rows: process tree (PSS) {tree_before / 2**20:.0f} MiB before, peak {peak.bytes / 2**20:.0f} MiB; "
          f"driver RSS growth {driver_growth / 2**20:.0f} MiB; {summary.rows_per_second:,.0f} rows/s")
    assert summary.rows == 200_000 and pq.ParquetFile(tmp_path / "out.parquet").metadata.num_rows == 200_000
    assert peak.bytes - tree_before < 1.5 * 2**30  # the driver, the object store, the read workers and the actor together
    assert driver_growth < 100 * 2**20  # the driver writes block by block; it never holds the table
    assert summary.steady_rows > 0.9 * summary.rows  # verdicts reached the driver batch by batch, not at the end


def test_two_actors_give_the_one_actor_result(image_bundle: Path, tmp_path: Path) -> None:
    images = sample_images(make_models(0), 300, seed=13)
    np.save(tmp_path / "images.npy", images)
    one = score_file(tmp_path / "images.npy", image_bundle, tmp_path / "one.parquet", BatchOptions(actors=1, batch_size=32))
    two = score_file(tmp_path / "images.npy", image_bundle, tmp_path / "two.parquet", BatchOptions(actors=2, batch_size=32))
    assert pq.read_table(tmp_path / "one.parquet").equals(pq.read_table(tmp_path / "two.parquet"))
    assert (one.ood, one.scored) == (two.ood, two.scored) == (one.ood, 300)


def test_drift_fires_where_the_stored_order_turns_ood(vector_bundle: Path, tmp_path: Path) -> None:
    rows = np.random.default_rng(7).normal(0.0, 1.0, (3000, len(FEATURES)))
    rows[2000:] += 3.0
    pd.DataFrame(rows, columns=FEATURES).to_parquet(tmp_path / "shift.parquet")
    report = score_file(tmp_path / "shift.parquet", vector_bundle, tmp_path / "out.parquet", BatchOptions(drift=True)).drift
    assert report is not None and report["martingale"]["alarm"] and 2000 <= report["martingale"]["row"] < 2200
    calm = pd.DataFrame(rows[:2000], columns=FEATURES)
    calm.to_parquet(tmp_path / "calm.parquet")
    quiet = score_file(tmp_path / "calm.parquet", vector_bundle, tmp_path / "out.parquet", BatchOptions(drift=True)).drift
    assert quiet is not None and not quiet["martingale"]["alarm"] and quiet["inputs"] == 2000


def test_python_api_score_dataset_and_score_frame(vector_bundle: Path, image_bundle: Path, tmp_path: Path) -> None:
    rows = vector_rows(50, seed=8)
    frame = pd.DataFrame(rows, columns=FEATURES).assign(key=np.arange(50))
    verdicts = score_dataset(ray.data.from_pandas(frame), vector_bundle, batch_size=16).to_pandas()
    local = score_frame(frame, vector_bundle)
    served = http_results(vector_bundle, rows.astype(np.float32))
    assert_same_as_http(verdicts.sort_values("key").reset_index(drop=True), served)
    assert_same_as_http(local, served)
    assert local["key"].tolist() == list(range(50))
    images = sample_images(make_models(0), 10, seed=14)
    assert_same_as_http(score_frame(images, image_bundle), http_results(image_bundle, images, npy=True))
    encoded = ray.data.from_items([{"png": _png(image)} for image in images])
    scored = score_dataset(encoded, image_bundle, payload=Payload("encoded", "png")).to_pandas()
    assert scored["p_value"].tolist() == score_frame(images, image_bundle)["p_value"].tolist()


def _png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image.reshape(28, 28)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_the_command_prints_the_summary(vector_bundle: Path, tmp_path: Path) -> None:
    pd.DataFrame(vector_rows(100, seed=9), columns=FEATURES).to_csv(tmp_path / "rows.csv", index=False)
    result = CliRunner().invoke(cli_app, ["score", str(tmp_path / "rows.csv"), "--bundle", str(vector_bundle), "--out",
                                          str(tmp_path / "out.parquet"), "--drift", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "rows: 100 read, 100 scored, 0 bad" in result.output and "95% Clopper-Pearson interval" in result.output
    assert "drift martingale:" in result.output and f"written: {tmp_path / 'out.parquet'}" in result.output


def test_score_is_registered_only_with_the_batch_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    def names(app: typer.Typer) -> set[str]:
        return {command.name or "" for command in app.registered_commands}

    app = typer.Typer()
    optional.register_optional_commands(app)
    assert "score" in names(app)
    monkeypatch.setattr(optional, "is_installed", lambda module: module != "ray")
    without = typer.Typer()
    optional.register_optional_commands(without)
    assert "score" not in names(without)


def raylets() -> int:
    """Running Ray node managers on this machine."""
    return sum(1 for entry in Path("/proc").iterdir() if entry.name.isdigit() and "ray/raylet/raylet " in _cmdline(entry))


def _cmdline(entry: Path) -> str:
    try:
        return (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def test_the_command_starts_and_stops_its_own_local_ray(image_bundle: Path, tmp_path: Path) -> None:
    np.save(tmp_path / "images.npy", sample_images(make_models(0), 40, seed=15))
    before = raylets()
    assert before >= 1  # the module's Ray
    result = subprocess.run(
        [sys.executable, "-m", "oodserve.cli", "score", str(tmp_path / "images.npy"), "--bundle", str(image_bundle), "--out",
         str(tmp_path / "out.parquet"), "--json", "--no-progress", "--object-store-mb", "100"],
        capture_output=True, text=True, timeout=240,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads(result.stdout)
    assert summary["rows"] == summary["scored"] == 40 and summary["ood_rate_ci95"][0] <= summary["ood_rate"]
    assert raylets() == before  # its Ray is gone with it (the module's own Ray is still there)


def test_gpus_per_actor_follow_onnxruntime_and_the_provider_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(batch_run, "available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert batch_run.default_gpus_per_actor(RuntimeOptions()) == 1.0
    assert batch_run.default_gpus_per_actor(RuntimeOptions(providers=("CPUExecutionProvider",))) == 0.0
    monkeypatch.setattr(batch_run, "available_providers", lambda: ["CPUExecutionProvider"])
    assert batch_run.default_gpus_per_actor(RuntimeOptions()) == 0.0
