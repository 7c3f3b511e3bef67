"""Does summing SNGP's precision matrix on eval-mode features (the ones the served graph computes) rather than
on the last epoch's train-mode features change what its variance detects? One trained checkpoint, two
precisions over the same training images, MNIST and Fashion-MNIST-test AUROC of the predictive variance.

    python -m benchmarks.sngp_precision --checkpoint runs/bundle-sngp20/sngp/model.pt

Train mode differs by BatchNorm's batch statistics (and one power-iteration step of every spectral norm per
batch); the old training loop also fed augmented (flipped) batches. Both train-mode variants are measured.
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from oodserve.models.data import DEFAULT_FASHION_MNIST_DIR, FASHION_MNIST_LABELS, load_image_dataset, load_images
from oodserve.models.sngp.gp import predictive_variance
from oodserve.models.sngp.train import load_checkpoint, standardize
from oodserve.models.splits import bundle_split

MNIST_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mnist"


@torch.no_grad()
def precision_of(model: torch.nn.Module, images: torch.Tensor, train_mode: bool, flip: bool, batch_size: int = 128) -> torch.Tensor:
    """`ridge I + sum Phi^T Phi` over `images` (N, C, H, W) with the backbone in train or eval mode (on a copy)."""
    probe = copy.deepcopy(model)
    probe.train(train_mode)
    generator = torch.Generator().manual_seed(0)
    precision = probe.gp.ridge * torch.eye(probe.gp.num_random_features, dtype=torch.float64)
    order = torch.randperm(images.shape[0], generator=generator)
    for start in range(0, images.shape[0], batch_size):
        batch = images[order[start : start + batch_size]]
        if flip:
            mirrored = torch.rand(batch.shape[0], generator=generator) < 0.5
            batch = torch.where(mirrored[:, None, None, None], batch.flip(-1), batch)
        features = probe.gp.random_features(probe.backbone(batch)).double()
        precision += features.t() @ features
    return precision


@torch.no_grad()
def variances(model: torch.nn.Module, images: torch.Tensor, covariance: torch.Tensor) -> np.ndarray:
    model.eval()
    parts = []
    for start in range(0, images.shape[0], 1000):
        features = model.gp.random_features(model.backbone(images[start : start + 1000]))
        parts.append(predictive_variance(features, covariance, model.gp.ridge))
    return torch.cat(parts).numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/sngp-precision-mode.json"))
    parser.add_argument("--threads", type=int, default=2)
    arguments = parser.parse_args()
    torch.set_num_threads(arguments.threads)
    model, _ = load_checkpoint(arguments.checkpoint)
    data = load_image_dataset(DEFAULT_FASHION_MNIST_DIR, class_names=FASHION_MNIST_LABELS)
    train_images = standardize(data.images[bundle_split(len(data.images), seed=0).train], model.config)
    test = standardize(load_images(DEFAULT_FASHION_MNIST_DIR, "test").images, model.config)
    mnist = standardize(load_images(MNIST_DIR, "test").images, model.config)
    results: dict[str, object] = {"checkpoint": str(arguments.checkpoint), "train_images": int(train_images.shape[0])}
    for name, train_mode, flip in (("eval mode (served features)", False, False), ("train mode", True, False),
                                   ("train mode, flipped batches (the old loop)", True, True)):
        covariance = torch.linalg.inv(precision_of(model, train_images, train_mode, flip)).float()
        inside, outside = variances(model, test, covariance), variances(model, mnist, covariance)
        auroc = roc_auc_score(np.r_[np.zeros(inside.size), np.ones(outside.size)], np.r_[inside, outside])
        results[name] = {"mnist_auroc": round(float(auroc), 4), "median_variance_fmnist_test": float(np.median(inside)),
                         "median_variance_mnist": float(np.median(outside))}
        print(f"{name}: MNIST AUROC of sngp variance {auroc:.4f}")
    arguments.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"written {arguments.out}")


if __name__ == "__main__":
    main()
