"""Self-made out-of-distribution inputs from in-distribution images (numpy only).

Used to choose the fusion rule without real OOD data and as extra OOD sets in the
evaluation report. Every image function maps uint8 images `(N, H, W)` or `(N, C, H, W)` (the last two
axes are height and width) to uint8 images of the same shape and is deterministic given `rng`.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

Perturbation = Callable[[np.ndarray, np.random.Generator], np.ndarray]


def uniform_noise(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Images of i.i.d. uniform 0..255 pixels (ignores the content)."""
    return rng.integers(0, 256, size=images.shape, dtype=np.uint8)


def gaussian_noise_added(images: np.ndarray, rng: np.random.Generator, sigma: float = 40.0) -> np.ndarray:
    """Additive Gaussian pixel noise (sigma in 0..255 units), clipped."""
    noisy = images.astype(np.float64) + rng.normal(0.0, sigma, size=images.shape)
    return np.clip(np.rint(noisy), 0, 255).astype(np.uint8)


def mutate_pixels(images: np.ndarray, rng: np.random.Generator, rate: float = 0.3) -> np.ndarray:
    """Ren et al. 2019 mutation: each pixel replaced with probability `rate` by a uniform value."""
    mask = rng.random(images.shape) < rate
    replacement = rng.integers(0, 256, size=images.shape, dtype=np.uint8)
    return np.where(mask, replacement, images).astype(np.uint8)


def invert(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Photographic negative: 255 - x (bright background, dark object)."""
    return (255 - images).astype(np.uint8)


def flip_vertical(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Upside-down images (Fashion-MNIST objects have a canonical orientation)."""
    return np.ascontiguousarray(images[..., ::-1, :])


def rotate_90(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Images rotated by 90 degrees (by 180 when they are not square, to keep their shape)."""
    square = images.shape[-1] == images.shape[-2]
    return np.ascontiguousarray(np.rot90(images, k=1 if square else 2, axes=(-2, -1)))


def pixel_shuffle(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Each image's pixels permuted at random: same histogram, no spatial structure."""
    flat = images.reshape(len(images), -1).copy()
    for row in flat:
        rng.shuffle(row)
    return flat.reshape(images.shape)


def constant_images(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Flat images of one random grey level each."""
    levels = rng.integers(0, 256, size=(len(images),) + (1,) * (images.ndim - 1), dtype=np.uint8)
    return np.broadcast_to(levels, images.shape).copy()


def block_patches(images: np.ndarray, rng: np.random.Generator, block: int = 7) -> np.ndarray:
    """Coarse random checkerboards of `block`-pixel squares (simple synthetic glyph-like images)."""
    leading, (height, width) = images.shape[:-2], images.shape[-2:]
    coarse = rng.integers(0, 2, size=(*leading, -(-height // block), -(-width // block))).astype(np.uint8) * 255
    tiles = np.ones((1,) * len(leading) + (block, block), dtype=np.uint8)
    return np.ascontiguousarray(np.kron(coarse, tiles)[..., :height, :width])


def box_blur(images: np.ndarray, rng: np.random.Generator, radius: int = 1) -> np.ndarray:
    """A (2 radius + 1)^2 box blur with edge padding: the same content without fine detail."""
    pad = [(0, 0)] * (images.ndim - 2) + [(radius, radius), (radius, radius)]
    padded = np.pad(images.astype(np.float64), pad, mode="edge")
    height, width = images.shape[-2:]
    total = sum(padded[..., dy : dy + height, dx : dx + width] for dy in range(2 * radius + 1) for dx in range(2 * radius + 1))
    return np.clip(np.rint(total / (2 * radius + 1) ** 2), 0, 255).astype(np.uint8)


def colour_shift(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Colour images with their channels rotated and a random offset per channel; greyscale images
    brightened or darkened by a random offset (clipped)."""
    shifted = images.astype(np.int64)
    if images.ndim == 4 and images.shape[1] > 1:
        shifted = np.roll(shifted, 1, axis=1)
        offsets = rng.integers(-60, 61, size=(len(images), images.shape[1], 1, 1))
    else:
        offsets = rng.choice([-80, 80], size=(len(images),) + (1,) * (images.ndim - 1))
    return np.clip(shifted + offsets, 0, 255).astype(np.uint8)


def crop_zoom(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random half-size crop of each image scaled back up (nearest neighbour): objects seen too close."""
    height, width = images.shape[-2:]
    out = np.empty_like(images)
    rows = (np.arange(height) * (height // 2) // height)
    columns = (np.arange(width) * (width // 2) // width)
    for index in range(len(images)):
        top, left = rng.integers(0, height - height // 2 + 1), rng.integers(0, width - width // 2 + 1)
        out[index] = images[index][..., top + rows[:, None], left + columns[None, :]]
    return out


PERTURBATIONS: dict[str, Perturbation] = {
    "uniform_noise": uniform_noise,
    "gaussian_noise": gaussian_noise_added,
    "mutated_30pct": mutate_pixels,
    "inverted": invert,
    "flipped_vertical": flip_vertical,
    "rotated_90": rotate_90,
    "pixel_shuffled": pixel_shuffle,
    "constant": constant_images,
    "checkerboard": block_patches,
    "blurred": box_blur,
    "colour_shifted": colour_shift,
    "cropped_zoomed": crop_zoom,
}


def make_perturbed_sets(images: np.ndarray, seed: int = 0, names: list[str] | None = None) -> dict[str, np.ndarray]:
    """Apply each named perturbation (default: all) to `images`, with one seeded generator each."""
    chosen = names if names is not None else list(PERTURBATIONS)
    unknown = sorted(set(chosen) - set(PERTURBATIONS))
    if unknown:
        raise KeyError(f"unknown perturbations {unknown}; known: {sorted(PERTURBATIONS)}")
    return {
        name: PERTURBATIONS[name](images, np.random.default_rng([seed, index]))
        for index, name in enumerate(chosen)
    }


# ---------------------------------------------------------------------------------------------- vectors

VectorPerturbation = Callable[[np.ndarray, np.random.Generator], np.ndarray]
"""Feature vectors (N, D) float -> (N, D) float, using the batch's own per-feature statistics."""


def _spread(features: np.ndarray) -> np.ndarray:
    std = features.std(axis=0)
    return np.where(std > 0, std, 1.0)


def vector_noise(scale: float) -> VectorPerturbation:
    """Gaussian noise of `scale` per-feature standard deviations added to every feature."""

    def perturb(features: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return features + rng.normal(0.0, 1.0, features.shape) * scale * _spread(features)

    return perturb


def shuffle_features_across_rows(features: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Each column permuted independently: the same marginals, no dependence between features."""
    return np.stack([rng.permutation(column) for column in features.T], axis=1)


def vector_scaling(factor: float) -> VectorPerturbation:
    """Every row moved `factor` times as far from the feature means."""

    def perturb(features: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        mean = features.mean(axis=0)
        return mean + factor * (features - mean)

    return perturb


def single_feature_outlier(features: np.ndarray, rng: np.random.Generator, deviations: float = 5.0) -> np.ndarray:
    """One random feature per row set `deviations` standard deviations above or below its mean."""
    perturbed = features.copy()
    rows = np.arange(len(features))
    columns = rng.integers(0, features.shape[1], len(features))
    signs = rng.choice([-1.0, 1.0], len(features))
    perturbed[rows, columns] = features.mean(axis=0)[columns] + signs * deviations * _spread(features)[columns]
    return perturbed


def gaussian_fit_samples(features: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Samples of a multivariate Gaussian with the batch's mean and covariance (right moments, wrong shape)."""
    covariance = np.atleast_2d(np.cov(features, rowvar=False)) + 1e-9 * np.eye(features.shape[1])
    return rng.multivariate_normal(features.mean(axis=0), covariance, size=len(features), method="eigh")


VECTOR_PERTURBATIONS: dict[str, VectorPerturbation] = {
    "noise_0.5sd": vector_noise(0.5),
    "noise_1sd": vector_noise(1.0),
    "noise_2sd": vector_noise(2.0),
    "features_shuffled": shuffle_features_across_rows,
    "scaled_1.5x": vector_scaling(1.5),
    "single_feature_outlier": single_feature_outlier,
    "gaussian_fit": gaussian_fit_samples,
}


def make_perturbed_vectors(features: np.ndarray, seed: int = 0) -> dict[str, np.ndarray]:
    """Every vector perturbation applied to `features` (N, D), one seeded generator each."""
    values = np.asarray(features, dtype=np.float64)
    return {
        name: perturb(values, np.random.default_rng([seed, index])) for index, (name, perturb) in enumerate(VECTOR_PERTURBATIONS.items())
    }
