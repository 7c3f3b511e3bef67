"""The GPU check's pieces that run without a GPU: its shell scripts parse, and its GPU-vs-CPU comparison counts
differences and moved verdicts correctly."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np

from oodserve.bench.gpu_check import compare

ROOT = Path(__file__).resolve().parents[3]


def test_scripts_parse() -> None:
    for script in ("benchmarks/gpu_check.sh", "benchmarks/gpu_wheels.sh"):
        assert subprocess.run(["bash", "-n", str(ROOT / script)], capture_output=True).returncode == 0, script


def test_compare_reports_largest_differences_and_moved_verdicts() -> None:
    cpu = {"signal": np.array([1.0, 2.0, np.inf]), "__fused_p__": np.array([0.04, 0.2, 0.009])}
    gpu = {"signal": np.array([1.0, 2.5, np.inf]), "__fused_p__": np.array([0.06, 0.2, 0.011])}
    report = compare(gpu, cpu)
    assert report["signal"]["max_abs"] == 0.5 and report["signal"]["max_rel"] == 0.25
    assert report["signal"]["non_finite_mismatch"] == 0
    assert report["verdict_changes"] == {"0.05": 1, "0.01": 1}
