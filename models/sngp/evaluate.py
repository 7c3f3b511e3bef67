"""Evaluate an exported SNGP through onnxruntime: accuracy, ECE and Fashion-MNIST vs OOD AUROCs.

Scores (higher = more OOD): the SNGP predictive variance (Liu et al. 2020), `1 - max softmax` of
the mean-field logits, and a DDU-style class-conditional Gaussian density on the `features`
output (Mukhoti et al. 2021: `-logsumexp_c log N(f; mu_c, Sigma_c)`), fitted on `split.train`
only, with per-class and with tied covariance.

Usage: `python -m oodserve.models.sngp.evaluate runs/sngp/sngp.onnx --out runs/sngp/ood_metrics.json`.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

import numpy as np

from oodserve.models.data import DEFAULT_FASHION_MNIST_DIR, load_images
from oodserve.models.evaluation.metrics import detection_metrics as shared_detection_metrics
from oodserve.models.sngp.train import _softmax, expected_calibration_error
from oodserve.models.splits import bundle_split

DEFAULT_OOD_DIR = Path("/work/shared/data/mnist")


def run_onnx(path: str | Path, images: np.ndarray, batch_size: int = 500, threads: int = 2) -> dict[str, np.ndarray]:
    """uint8 `(N, 28, 28)` -> {'logits' (N, K), 'variance' (N,), 'features' (N, F)} from the ONNX graph."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = [output.name for output in session.get_outputs()]
    parts: dict[str, list[np.ndarray]] = {name: [] for name in names}
    for start in range(0, images.shape[0], batch_size):
        batch = images[start : start + batch_size, None].astype(np.float32)
        for name, value in zip(names, session.run(None, {"x": batch})):
            parts[name].append(value)
    return {name: np.concatenate(values) for name, values in parts.items()}


def gaussian_log_densities(features: np.ndarray, means: np.ndarray, covariances: np.ndarray) -> np.ndarray:
    """`(N, F), (C, F), (C, F, F) -> (N, C)` log N(f; mu_c, Sigma_c) via Cholesky factors."""
    dimension = features.shape[1]
    columns = []
    for mean, covariance in zip(means, covariances):
        cholesky = np.linalg.cholesky(covariance)
        whitened = np.linalg.solve(cholesky, (features - mean).T)
        log_det = 2.0 * np.log(np.diag(cholesky)).sum()
        columns.append(-0.5 * (whitened**2).sum(0) - 0.5 * log_det - 0.5 * dimension * np.log(2 * np.pi))
    return np.stack(columns, axis=1)


def fit_class_gaussians(
    features: np.ndarray, labels: np.ndarray, tied: bool, jitter: float = 1e-4
) -> tuple[np.ndarray, np.ndarray]:
    """Class means `(C, F)` and covariances `(C, F, F)` (shared within-class covariance when `tied`)."""
    classes = np.unique(labels)
    means = np.stack([features[labels == c].mean(0) for c in classes])
    eye = np.eye(features.shape[1])
    if tied:
        centred = features - means[np.searchsorted(classes, labels)]
        shared = centred.T @ centred / len(features) + jitter * eye
        return means, np.repeat(shared[None], len(classes), axis=0)
    covariances = np.stack([np.cov(features[labels == c], rowvar=False) + jitter * eye for c in classes])
    return means, covariances


def density_score(features: np.ndarray, means: np.ndarray, covariances: np.ndarray) -> np.ndarray:
    """`-logsumexp_c log N(f; mu_c, Sigma_c)` per row (higher = more OOD)."""
    log_densities = gaussian_log_densities(features, means, covariances)
    top = log_densities.max(1, keepdims=True)
    return -(top[:, 0] + np.log(np.exp(log_densities - top).sum(1)))


def detection_metrics(in_scores: np.ndarray, out_scores: np.ndarray) -> dict[str, float]:
    """AUROC, AUPR (OOD positive) and FPR at 95% TPR for scores where higher = more OOD, as a dict."""
    return asdict(shared_detection_metrics(in_scores, out_scores))


def evaluate(onnx_path: str | Path, data_dir: str | Path, ood_dir: str | Path, threads: int = 2) -> dict:
    """All numbers for one exported model (train features only from `split.train`)."""
    train_file = load_images(data_dir, "train")
    test_file = load_images(data_dir, "test")
    ood_file = load_images(ood_dir, "test")
    if train_file.labels is None or test_file.labels is None:
        raise ValueError(f"{data_dir}: the evaluation needs the IDX label files of the training and test images")
    split = bundle_split(len(train_file.images))
    train_out = run_onnx(onnx_path, train_file.images[split.train], threads=threads)
    test_out = run_onnx(onnx_path, test_file.images, threads=threads)
    ood_out = run_onnx(onnx_path, ood_file.images, threads=threads)

    probabilities = _softmax(test_out["logits"])
    ood_probabilities = _softmax(ood_out["logits"])
    results: dict = {
        "test_accuracy": float((probabilities.argmax(1) == test_file.labels).mean()),
        "test_ece": expected_calibration_error(probabilities, test_file.labels, bins=15),
        "ood_set": str(ood_dir),
        "scores": {
            "sngp_variance": detection_metrics(test_out["variance"], ood_out["variance"]),
            "one_minus_max_prob": detection_metrics(1 - probabilities.max(1), 1 - ood_probabilities.max(1)),
        },
    }
    train_labels = train_file.labels[split.train]
    for name, tied in (("ddu_density_per_class", False), ("ddu_density_tied", True)):
        means, covariances = fit_class_gaussians(train_out["features"].astype(np.float64), train_labels, tied)
        results["scores"][name] = detection_metrics(
            density_score(test_out["features"].astype(np.float64), means, covariances),
            density_score(ood_out["features"].astype(np.float64), means, covariances),
        )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("onnx", type=Path)
    parser.add_argument("--data", type=Path, default=DEFAULT_FASHION_MNIST_DIR)
    parser.add_argument("--ood", type=Path, default=DEFAULT_OOD_DIR)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    results = evaluate(args.onnx, args.data, args.ood, args.threads)
    text = json.dumps(results, indent=2)
    print(text)
    if args.out is not None:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
