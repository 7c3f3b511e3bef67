"""Manifold signals of a rectangular flow bundle next to the default bundle's Glow signals: AUROC of each signal
and of each bundle's fused score, Fashion-MNIST test images against MNIST and the nine self-made
perturbations, plus the rectangular flow's on-manifold bits/dim and reconstruction error from training.

    .venv/bin/python -m benchmarks.manifold_signals --manifold DIR [--reference models/bundles/fashion-mnist] \
        --out benchmarks/results/manifold-signals.json

Scores go through the serving engine (`oodserve.engine.Engine`), in batches of 256.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from benchmarks.byod_images import score_all
from benchmarks.hybrid_iresnet import MNIST_DIR
from oodserve.engine import Engine
from oodserve.models.data import DEFAULT_FASHION_MNIST_DIR, load_images
from oodserve.models.evaluation.metrics import auroc
from oodserve.models.perturbations import make_perturbed_sets

NINE_PERTURBATIONS = ["uniform_noise", "gaussian_noise", "mutated_30pct", "inverted", "flipped_vertical", "rotated_90", "pixel_shuffled",
                      "constant", "checkerboard"]
REFERENCE_SIGNALS = ("typicality", "input_complexity")


def auroc_table(engine: Engine, inside: np.ndarray, sets: dict[str, np.ndarray], signals: tuple[str, ...] | None) -> dict[str, dict]:
    """{set: {signal or "fused": AUROC}} of in-distribution images against each set (all (N, 1, H, W) uint8)."""
    inside_signals, inside_fused, _, _ = score_all(engine, inside)
    chosen = signals or tuple(inside_signals)
    table = {}
    for name, images in sets.items():
        ood_signals, ood_fused, _, _ = score_all(engine, images)
        table[name] = {"fused": auroc(inside_fused, ood_fused), **{s: auroc(inside_signals[s], ood_signals[s]) for s in chosen}}
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--manifold", type=Path, required=True, help="bundle written by build-bundle --rectangular-checkpoint")
    parser.add_argument("--reference", type=Path, default=Path("models/bundles/fashion-mnist"))
    parser.add_argument("--limit", type=int, default=5000, help="test and MNIST images; perturbations use the first 2,000 test images")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/manifold-signals.json"))
    arguments = parser.parse_args()
    test = load_images(DEFAULT_FASHION_MNIST_DIR, "test").images[: arguments.limit, None]
    sets = {"mnist": load_images(MNIST_DIR, "test").images[: arguments.limit, None],
            **make_perturbed_sets(test[:2000], seed=11, names=NINE_PERTURBATIONS)}
    manifold = Engine.load(arguments.manifold)
    rows = {"manifold": auroc_table(manifold, test, sets, None),
            "glow (default bundle)": auroc_table(Engine.load(arguments.reference), test, sets, REFERENCE_SIGNALS)}
    manifest = json.loads((arguments.manifold / "manifest.json").read_text())
    training = manifest["provenance"]["training"]["flow"]
    result = {"test_images": len(test), "training": training, "fusion": manifest["fusion"], "auroc": rows}
    columns = [("manifold", s) for s in ["fused", *[k for k in rows["manifold"]["mnist"] if k != "fused"]]]
    columns += [("glow (default bundle)", s) for s in [*REFERENCE_SIGNALS, "fused"]]
    header = "| set | " + " | ".join(f"{'rect' if b == 'manifold' else 'glow'} {s}" for b, s in columns) + " |"
    lines = [header, "|" + "---|" * (len(columns) + 1)]
    for name in sets:
        lines.append(f"| {name} | " + " | ".join(f"{rows[b][name][s]:.3f}" for b, s in columns) + " |")
    table = "\n".join(lines)
    result["table"] = table
    arguments.out.parent.mkdir(parents=True, exist_ok=True)
    arguments.out.write_text(json.dumps(result, indent=1))
    arguments.out.with_suffix(".md").write_text(table + "\n")
    print(json.dumps(training, indent=1))
    print(table)


if __name__ == "__main__":
    main()
