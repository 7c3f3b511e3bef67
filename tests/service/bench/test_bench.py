"""`oodserve bench` with tiny request counts on the demo bundle: one table with every row (no timing assertions)."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from oodserve.bench.throughput import load_bench_images, percentile_ms, request_bodies
from oodserve.cli import app
from oodserve.models.data import read_idx

SECTIONS = ("service, dynamic batching", "service, naive (1 run/request)")


def test_bench_prints_one_table_with_every_row(repository_root: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("OODSERVE_INFERENCE_THREADS", "2")  # two inference threads: single images also side by side
    rows_file = tmp_path / "rows.json"
    arguments = [
        "bench", "--bundle", str(repository_root / "models/bundles/demo"), "--requests", "6", "--warmup-requests", "2",
        "--raw-seconds", "0.05", "--raw-batch-sizes", "1,4", "--single-image-runs", "5", "--json-out", str(rows_file),
    ]  # fmt: skip
    result = CliRunner().invoke(app, arguments)
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    assert lines[0].startswith("oodserve bench: fashion-mnist-demo") and lines[1].split()[:2] == ["measurement", "body"]
    table = lines[3:]
    assert table[0].startswith("raw onnxruntime (limit)") and "best batch" in table[0]
    assert table[1].startswith("raw onnxruntime 1 image  ") and table[2].startswith("raw onnxruntime 1 image, side by side")
    assert table[3].startswith("raw engine (onnxruntime + scoring)")
    served = [line for line in table if line.startswith("service")]
    expected = [(section, body, concurrency) for section in SECTIONS for body in ("json", "npy") for concurrency in (1, 4, 16, 64)]
    assert len(served) == len(expected) == len(table) - 4
    for line, (section, body, concurrency) in zip(served, expected):
        cells = line[len(section) :].split()
        assert line.startswith(section) and cells[0] == body and cells[1] == str(concurrency), line
    rows = json.loads(rows_file.read_text())["rows"]
    assert len(rows) == len(table)
    assert all(row["errors"] == 0 and row["images_per_second"] > 0 for row in rows)
    assert all(row["p50_ms"] <= row["p99_ms"] for row in rows if row["p50_ms"] is not None)
    served_rows = [row for row in rows if row["section"].startswith("service")]
    assert all(row["mean_run_batch"] is not None and row["mean_run_batch"] >= 1 for row in served_rows)


def test_bench_images_come_from_idx_files_or_synthetic_blobs(tmp_path: Path) -> None:
    images = load_bench_images(None, [1, 28, 28], 5, 0)
    assert images.shape == (5, 1, 28, 28) and images.dtype.name == "uint8" and images.std() > 10
    idx = tmp_path / "images-idx3-ubyte"
    idx.write_bytes(b"\0\0\x08\x03" + (3).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2 + images[:3].tobytes())
    assert (read_idx(idx) == images[:3, 0]).all()
    assert load_bench_images(idx, [1, 28, 28], 4, 1).shape == (4, 1, 28, 28)
    assert percentile_ms([0.001, 0.002, 0.003], 50) == 2.0


def test_request_bodies_group_images_per_request() -> None:
    import io

    import numpy as np
    import orjson


    images = load_bench_images(None, [1, 28, 28], 7, 2)
    npy, npy_type = request_bodies(images, "npy", 3)
    assert npy_type == "application/x-npy" and len(npy) == 2
    assert (np.load(io.BytesIO(npy[1]), allow_pickle=False) == images[3:6]).all()
    json_bodies, json_type = request_bodies(images, "json")
    assert json_type == "application/json" and len(json_bodies) == 7
    assert orjson.loads(json_bodies[4]) == {"instances": [images[4].tolist()]}
