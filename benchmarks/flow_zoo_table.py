"""The flow zoo's results table from trained run directories, one row per run.

For each `runs/<name>` written by `oodserve train flow`: parameters and training minutes (metrics.json),
Fashion-MNIST test bits/dim at the bin centre (what the service computes) and under uniform
dequantisation (the bound flow papers report), and onnxruntime CPU latency per image of the exported
density graph at batch 64. Run it on an otherwise idle machine:

    .venv/bin/python benchmarks/flow_zoo_table.py runs/flow-glow-45 runs/flow-nsf-10min ... [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from oodserve.models.data import DEFAULT_FASHION_MNIST_DIR, load_images  # noqa: E402
from oodserve.models.flows.export import export_flow, onnx_latency_per_image_ms  # noqa: E402
from oodserve.models.flows.train import evaluate_bits_per_dim, evaluate_dequantized_bits_per_dim, load_checkpoint_flow  # noqa: E402


def measure_run(run: Path, test_pixels: torch.Tensor, latency_threads: int) -> dict[str, object]:
    """One row: the run's own metrics plus both test bits/dim and the ONNX latency measured now."""
    metrics = json.loads((run / "metrics.json").read_text())
    flow, _ = load_checkpoint_flow(run / "best.pt")
    with tempfile.TemporaryDirectory() as scratch:
        density_path, _ = export_flow(flow, Path(scratch) / "flow.onnx")
        latency = {threads: onnx_latency_per_image_ms(density_path, 64, 20, threads) for threads in (1, latency_threads)}
    return {
        "run": str(run),
        "family": metrics["family"],
        "config": metrics["config"],
        "parameters": metrics["parameters"],
        "train_minutes": metrics["train_minutes"],
        "steps": metrics["steps"],
        "test_bpd_bin_centre": evaluate_bits_per_dim(flow, test_pixels),
        "test_bpd_dequantized": evaluate_dequantized_bits_per_dim(flow, test_pixels, seed=0),
        "onnx_ms_per_image_batch64": {str(threads): value for threads, value in latency.items()},
    }


def markdown(rows: list[dict[str, object]], latency_threads: int) -> str:
    header = (
        "| family | run | parameters | training minutes | steps | test bits/dim, dequantised | test bits/dim, bin centre "
        f"| ONNX ms/image at batch 64 (1 / {latency_threads} threads) |"
    )
    lines = [header, "|" + "---|" * 8]
    for row in rows:
        latency = row["onnx_ms_per_image_batch64"]
        lines.append(
            f"| {row['family']} | {Path(str(row['run'])).name} | {row['parameters']:,} | {row['train_minutes']:.1f} | {row['steps']:,} "
            f"| {row['test_bpd_dequantized']:.3f} | {row['test_bpd_bin_centre']:.3f} "
            f"| {latency['1']:.3f} / {latency[str(latency_threads)]:.3f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run directories with best.pt and metrics.json")
    parser.add_argument("--data", default=str(DEFAULT_FASHION_MNIST_DIR), help="Fashion-MNIST directory (test split is used)")
    parser.add_argument("--latency-threads", type=int, default=2, help="second onnxruntime thread count to time")
    parser.add_argument("--out", type=Path, help="also write the rows as JSON here")
    arguments = parser.parse_args()
    test_pixels = torch.from_numpy(load_images(arguments.data, "test").images).unsqueeze(1)  # (N, 1, 28, 28) uint8
    rows = [measure_run(run, test_pixels, arguments.latency_threads) for run in tqdm(arguments.runs, desc="runs")]
    print(markdown(rows, arguments.latency_threads))
    if arguments.out:
        arguments.out.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
