"""JKO against end-to-end training of the same flow for the same wall-clock budget: test bits/dim (dequantised)
of the EMA snapshots saved at given training minutes, and the trained map's summed transport cost
sum_k E||T_k(x) - x||^2 (`oodserve.models.flows.jko.transport_cost`), with a plot of both against the minutes.

    .venv/bin/python -m benchmarks.jko_vs_joint --run jko=runs/jko/jko --run joint=runs/jko/joint \
        --out benchmarks/results/jko-vs-joint.json

The runs come from `oodserve train flow ... --schedule jko|joint --snapshot-minutes 10 --snapshot-minutes 20 ...`.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from oodserve.models.data import DEFAULT_FASHION_MNIST_DIR, load_images  # noqa: E402
from oodserve.models.flows.jko import transport_cost  # noqa: E402
from oodserve.models.flows.preprocessing import centre_of_bin  # noqa: E402
from oodserve.models.flows.train import evaluate_dequantized_bits_per_dim, load_checkpoint_flow  # noqa: E402


def snapshots(run: Path) -> list[tuple[float, Path]]:
    """(minutes, path) of every snapshot-<m>min.pt in `run`, by minutes."""
    found = []
    for path in run.glob("snapshot-*min.pt"):
        match = re.fullmatch(r"snapshot-([0-9.]+)min\.pt", path.name)
        if match:
            found.append((float(match.group(1)), path))
    return sorted(found)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", action="append", required=True, help="NAME=DIR of a training run; repeatable")
    parser.add_argument("--limit", type=int, default=5000, help="test images for bits/dim")
    parser.add_argument("--transport-images", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/jko-vs-joint.json"))
    arguments = parser.parse_args()
    torch.set_num_threads(arguments.threads)
    pixels = torch.from_numpy(load_images(DEFAULT_FASHION_MNIST_DIR, "test").images[: arguments.limit]).unsqueeze(1)
    results: dict[str, dict] = {}
    for item in arguments.run:
        name, directory = item.split("=", 1)
        run = Path(directory)
        rows = []
        for minutes, path in snapshots(run):
            flow, checkpoint = load_checkpoint_flow(path)
            rows.append({"minutes": minutes, "step": checkpoint["state"]["step"],
                         "test_bpd_dequantized": evaluate_dequantized_bits_per_dim(flow, pixels, progress=f"{name} {minutes:g} min"),
                         "transport_cost": transport_cost(flow, centre_of_bin(pixels[: arguments.transport_images]))})
            print(name, rows[-1])
        metrics = json.loads((run / "metrics.json").read_text()) if (run / "metrics.json").exists() else {}
        results[name] = {"snapshots": rows, "final": {key: metrics.get(key) for key in
                                                       ("test_bpd_dequantized", "test_transport_cost", "steps", "train_minutes", "schedule",
                                                        "jko_steps", "jko_step_size", "parameters")}}
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for name, result in results.items():
        minutes = [row["minutes"] for row in result["snapshots"]]
        left.plot(minutes, [row["test_bpd_dequantized"] for row in result["snapshots"]], marker="o", label=name)
        right.plot(minutes, [row["transport_cost"] for row in result["snapshots"]], marker="o", label=name)
    left.set(xlabel="training minutes", ylabel="test bits/dim (dequantised)", title="density")
    right.set(xlabel="training minutes", ylabel="sum_k E||T_k(x) - x||^2", title="transport cost of the map", yscale="log")
    for axis in (left, right):
        axis.grid(alpha=0.3)
        axis.legend()
    figure.tight_layout()
    arguments.out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(arguments.out.with_suffix(".png"), dpi=110)
    lines = ["| run | minutes | steps | test bpd (dequantised) | transport cost |", "|---|---|---|---|---|"]
    for name, result in results.items():
        lines += [f"| {name} | {row['minutes']:g} | {row['step']} | {row['test_bpd_dequantized']:.3f} | {row['transport_cost']:.1f} |"
                  for row in result["snapshots"]]
    table = "\n".join(lines)
    arguments.out.write_text(json.dumps({"results": results, "table": table}, indent=1))
    arguments.out.with_suffix(".md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
