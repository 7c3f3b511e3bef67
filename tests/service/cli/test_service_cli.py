"""`oodserve info` and `oodserve serve`: a real uvicorn process serves a bundle; a tampered one refuses to start."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
from typer.testing import CliRunner

from oodserve.bench.http_driver import free_port
from oodserve.cli import app


def test_info_prints_the_verified_summary(bundle_dir: Path) -> None:
    result = CliRunner().invoke(app, ["info", "--bundle", str(bundle_dir)])
    assert result.exit_code == 0, result.output
    assert "all 4 files match their sha256" in result.output and "CPUExecutionProvider" in result.output
    as_json = CliRunner().invoke(app, ["info", "--bundle", str(bundle_dir), "--json"])
    assert json.loads(as_json.output)["name"] == "test-bundle"


def test_info_refuses_a_tampered_bundle(bundle_dir: Path, tmp_path: Path) -> None:
    copy = Path(shutil.copytree(bundle_dir, tmp_path / "bundle"))
    (copy / "flow.onnx").write_bytes((copy / "flow.onnx").read_bytes() + b"\0")
    result = CliRunner().invoke(app, ["info", "--bundle", str(copy)])
    assert result.exit_code == 2 and "altered file 'flow.onnx'" in result.output


def test_serve_runs_uvicorn_until_ready_and_scores(bundle_dir: Path, tmp_path: Path) -> None:
    port = free_port()
    command = [sys.executable, "-m", "oodserve.cli", "serve", "--bundle", str(bundle_dir), "--port", str(port)]
    log = (tmp_path / "serve.log").open("w")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert process.poll() is None, (tmp_path / "serve.log").read_text()
            assert time.monotonic() < deadline, (tmp_path / "serve.log").read_text()
            time.sleep(0.2)
        response = httpx.post(f"http://127.0.0.1:{port}/v1/score", json={"instances": [np.zeros((28, 28), int).tolist()]})
        assert response.status_code == 200 and response.json()["results"][0]["is_ood"] is True
        assert "oodserve_model_info" in httpx.get(f"http://127.0.0.1:{port}/metrics").text
    finally:
        process.terminate()
        process.wait(timeout=20)
        log.close()
    assert "active provider CPUExecutionProvider" in (tmp_path / "serve.log").read_text()


def test_serve_refuses_to_start_on_a_missing_file(bundle_dir: Path, tmp_path: Path) -> None:
    copy = Path(shutil.copytree(bundle_dir, tmp_path / "bundle"))
    (copy / "calibration.npz").unlink()
    completed = subprocess.run(
        [sys.executable, "-m", "oodserve.cli", "serve", "--bundle", str(copy), "--port", str(free_port())],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert completed.returncode == 2
    assert "refusing to start" in completed.stderr and "missing file 'calibration.npz'" in completed.stderr
