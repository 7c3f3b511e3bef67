"""Check the shipped bundle's targets through the HTTP API of a running server.

    oodserve serve --bundle models/bundles/fashion-mnist --port 8000 &
    python benchmarks/http_targets.py --url http://127.0.0.1:8000

Sends the 10,000 Fashion-MNIST test images and the 10,000 MNIST test images as JSON score requests
and prints: AUROC of `score` (and of each signal), the fraction of Fashion-MNIST test images with
`is_ood` at alpha 0.05 and 0.01 (each from requests made with that alpha), the batch-test verdicts,
and SNGP accuracy from `prediction.class_index`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import httpx
import numpy as np
from sklearn.metrics import roc_auc_score
from tqdm import tqdm

from oodserve.models.data import DEFAULT_FASHION_MNIST_DIR, load_images

MNIST_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"


def score_all(client: httpx.Client, url: str, images: np.ndarray, alpha: float, batch: int, what: str) -> list[dict]:
    results, batches = [], []
    for start in tqdm(range(0, len(images), batch), desc=f"{what} alpha={alpha}", unit="request"):
        response = client.post(f"{url}/v1/score", json={"instances": images[start : start + batch].tolist(), "alpha": alpha})
        response.raise_for_status()
        body = response.json()
        results.extend(body["results"])
        if "batch" in body:
            batches.append(body["batch"]["is_ood"])
    return results, batches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    args = parser.parse_args()

    fashion = load_images(DEFAULT_FASHION_MNIST_DIR, "test")
    mnist = load_images(MNIST_DIR, "test")
    f_images, f_labels, m_images = fashion.images[: args.limit], fashion.labels[: args.limit], mnist.images[: args.limit]
    with httpx.Client(timeout=120.0) as client:
        f05, f_batches = score_all(client, args.url, f_images, 0.05, args.batch, "fashion-mnist")
        f01, _ = score_all(client, args.url, f_images, 0.01, args.batch, "fashion-mnist")
        m05, m_batches = score_all(client, args.url, m_images, 0.05, args.batch, "mnist")

    labels = np.r_[np.zeros(len(f05)), np.ones(len(m05))]
    figures = {
        "images": {"fashion_mnist_test": len(f05), "mnist_test": len(m05)},
        "auroc_score": roc_auc_score(labels, [r["score"] for r in f05 + m05]),
        "auroc_by_signal": {
            name: roc_auc_score(labels, [r["signals"][name] for r in f05 + m05]) for name in f05[0]["signals"]
        },
        "fashion_is_ood_fraction_alpha_0.05": float(np.mean([r["is_ood"] for r in f05])),
        "fashion_is_ood_fraction_alpha_0.01": float(np.mean([r["is_ood"] for r in f01])),
        "mnist_is_ood_fraction_alpha_0.05": float(np.mean([r["is_ood"] for r in m05])),
        "accuracy_class_index": float(np.mean([r["prediction"]["class_index"] for r in f05] == f_labels)),
        f"batch_test_ood_fraction_fashion_batches_of_{args.batch}": float(np.mean(f_batches)) if f_batches else None,
        f"batch_test_ood_fraction_mnist_batches_of_{args.batch}": float(np.mean(m_batches)) if m_batches else None,
    }
    text = json.dumps(figures, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
