"""Make the RGB image sets the bring-your-own-data benchmark uses (nothing of the kind ships here):
Fashion-MNIST or MNIST images tinted with a random colour per image on a random coloured background,
resized to 32x32 (Pillow bilinear), channels-last uint8, saved as `.npz` with `x` and `y`.

    .venv/bin/python -m benchmarks.make_rgb_set --out /tmp/fmnist-rgb32 [--count 50000]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

from oodserve.models.data import DEFAULT_FASHION_MNIST_DIR, load_images

MNIST_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mnist"


def tint(images: np.ndarray, seed: int, side: int = 32) -> np.ndarray:
    """Greyscale (N, 28, 28) -> RGB (N, side, side, 3): x * foreground + (1 - x) * background colours per image."""
    rng = np.random.default_rng(seed)
    foreground = rng.uniform(0.35, 1.0, (len(images), 1, 1, 3))
    background = rng.uniform(0.0, 0.45, (len(images), 1, 1, 3))
    alpha = images.astype(np.float64)[..., None] / 255.0
    coloured = np.clip(np.rint(255.0 * (alpha * foreground + (1 - alpha) * background)), 0, 255).astype(np.uint8)
    return np.stack([np.asarray(Image.fromarray(image).resize((side, side), Image.Resampling.BILINEAR)) for image in coloured])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="directory for train.npz, test.npz and mnist.npz")
    parser.add_argument("--count", type=int, default=50000, help="training images (of the 60,000)")
    arguments = parser.parse_args()
    arguments.out.mkdir(parents=True, exist_ok=True)
    train, test = load_images(DEFAULT_FASHION_MNIST_DIR, "train"), load_images(DEFAULT_FASHION_MNIST_DIR, "test")
    np.savez(arguments.out / "train.npz", x=tint(train.images[: arguments.count], seed=0), y=train.labels[: arguments.count])
    np.savez(arguments.out / "test.npz", x=tint(test.images, seed=1), y=test.labels)
    mnist = load_images(MNIST_DIR, "test")
    np.savez(arguments.out / "mnist.npz", x=tint(mnist.images, seed=2), y=mnist.labels)
    print(f"wrote {arguments.out}/train.npz ({arguments.count}), test.npz (10,000), mnist.npz (10,000 tinted MNIST)")


if __name__ == "__main__":
    main()
