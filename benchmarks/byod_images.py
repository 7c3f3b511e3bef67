"""Measure a fitted image bundle on data made here: AUROC of the fused score of held-out in-distribution
images against each OOD set, the verdict's false-positive rate at alpha 0.05 with its Clopper-Pearson
interval, classification accuracy, and every signal's AUROC.

    .venv/bin/python -m benchmarks.byod_images --bundle DIR --inliers test.npz --ood mnist=mnist.npz [--ood ...] [--out FILE.json]

`.npz` files hold `x` (N, H, W[, C]) or (N, C, H, W) uint8 and optionally `y`; perturbed copies of the
inliers (`oodserve.models.perturbations`) are added as further OOD sets.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import orjson

from benchmarks.byod import clopper_pearson
from oodserve.engine import Engine
from oodserve.models.data import load_image_dataset
from oodserve.models.evaluation.metrics import auroc
from oodserve.models.perturbations import make_perturbed_sets


def score_all(engine: Engine, images: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray, np.ndarray | None]:
    """(signals, fused score, is_ood at 0.05, predicted class) of images (N, C, H, W) uint8, in batches of 256."""
    parts = [engine.score(images[start : start + 256].astype(np.float32), 0.05) for start in range(0, len(images), 256)]
    signals = {name: np.concatenate([part.signals[name] for part in parts]) for name in parts[0].signals}
    predicted = None if parts[0].predicted_class is None else np.concatenate([part.predicted_class for part in parts])
    return signals, np.concatenate([p.fused_score for p in parts]), np.concatenate([p.is_ood for p in parts]), predicted


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--inliers", type=Path, required=True, help="held-out in-distribution images (never used by the fit)")
    parser.add_argument("--ood", action="append", default=[], help="NAME=PATH of an OOD image set; repeatable")
    parser.add_argument("--limit", type=int, default=3000, help="images per set")
    parser.add_argument("--out", type=Path, default=None)
    arguments = parser.parse_args()
    engine = Engine.load(arguments.bundle)
    inliers = load_image_dataset(arguments.inliers)
    images = inliers.images[: arguments.limit]
    inside_signals, inside_score, inside_verdict, predicted = score_all(engine, images)
    sets = {
        name: load_image_dataset(path, labels="none").images[: arguments.limit]
        for name, path in (item.split("=", 1) for item in arguments.ood)
    }
    sets.update({f"perturbed {name}": values for name, values in make_perturbed_sets(images[:1000], seed=7).items()})
    rows = {}
    for name, values in sets.items():
        signals, score, _, _ = score_all(engine, values)
        rows[name] = {"fused": auroc(inside_score, score), **{signal: auroc(inside_signals[signal], signals[signal]) for signal in signals}}
    false_positives = int(inside_verdict.sum())
    result = {
        "bundle": str(arguments.bundle),
        "inliers": len(images),
        "fpr_at_0.05": false_positives / len(images),
        "fpr_interval": clopper_pearson(false_positives, len(images)),
        "accuracy": None if predicted is None or inliers.labels is None else float(np.mean(predicted == inliers.labels[: arguments.limit])),
        "auroc": rows,
        "fusion": engine.manifest.fusion.signals,
    }
    print(f"bundle {engine.name}: fusion {engine.manifest.fusion.method} over {engine.manifest.fusion.signals}")
    low, high = result["fpr_interval"]
    print(
        f"held-out inliers {len(images)}: FPR at alpha 0.05 = {result['fpr_at_0.05']:.4f} [{low:.4f}, {high:.4f}], "
        f"accuracy {result['accuracy']}"
    )
    for name, values in rows.items():
        print(f"{name:28s} fused AUROC {values['fused']:.4f}   best signal {max((v, k) for k, v in values.items() if k != 'fused')}")
    if arguments.out is not None:
        arguments.out.write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2))


if __name__ == "__main__":
    main()
