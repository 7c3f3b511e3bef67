"""`oodserve fit`: read the data, pick the pipeline for its modality, print the summary table."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from oodserve.models.data import DataError, is_vector_file, load_image_dataset, load_vectors, parse_resize
from oodserve.models.fit.images import ImageFitOptions, fit_images
from oodserve.models.fit.summary import FitResult
from oodserve.models.fit.vectors import fit_vectors

DEFAULT_MINUTES = 5.0


@dataclass(frozen=True)
class FitSettings:
    """What `oodserve fit` controls."""

    data: Path
    out: Path
    name: str | None = None
    minutes: float = DEFAULT_MINUTES
    labels: str = "auto"
    label_column: str | None = None
    seed: int = 0
    work: Path | None = None
    default_alpha: float = 0.05
    delta: float | None = None
    """Vectors: the calibration-conditional guarantee, FPR <= alpha with probability >= 1 - delta over the calibration draw."""
    resize: str | None = None
    """Images: HxW to resize every image to (sides 8..64)."""
    image_options: ImageFitOptions | None = None


def bundle_name(settings: FitSettings) -> str:
    """--name, else the output directory's name made a valid bundle name."""
    name = settings.name or settings.out.name
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-._") or "bundle"
    return cleaned if cleaned[0].isalnum() else f"b{cleaned}"


def fit(settings: FitSettings, class_names: list[str] | None = None) -> FitResult:
    """Fit a bundle for `settings.data`: feature vectors (.npy / .npz (N, D), CSV, Parquet) or images (IDX,
    .npy / .npz of (N, H, W[, C]) or (N, C, H, W), a folder of class folders or of images)."""
    if settings.minutes <= 0:
        raise DataError(f"--minutes must be positive, got {settings.minutes:g}")
    if not settings.data.exists():
        raise DataError(f"{settings.data}: no such file or directory")
    if is_vector_file(settings.data):
        if settings.resize is not None:
            raise DataError(f"{settings.data}: --resize applies to images, and this file holds feature vectors")
        data = load_vectors(settings.data, settings.label_column, settings.labels)
        try:
            return fit_vectors(data, settings.out, name=bundle_name(settings), minutes=settings.minutes, seed=settings.seed,
                               work=settings.work, default_alpha=settings.default_alpha, delta=settings.delta)
        except ValueError as error:
            raise DataError(str(error)) from error
    if settings.label_column is not None:
        raise DataError(
            f"{settings.data}: --label-column names a CSV / Parquet column; image labels come from `y`, IDX label files or class folders"
        )
    if settings.delta is not None:
        raise DataError(f"{settings.data}: --guarantee conditional is offered for feature vectors; image bundles are calibrated marginally")
    images = load_image_dataset(settings.data, settings.labels, parse_resize(settings.resize), class_names)
    return fit_images(images, settings.out, name=bundle_name(settings), minutes=settings.minutes, seed=settings.seed, work=settings.work,
                      default_alpha=settings.default_alpha, options=settings.image_options)


def format_summary(result: FitResult) -> str:
    """The summary rows as an aligned two-column table."""
    width = max(len(key) for key, _ in result.summary)
    return "\n".join([f"bundle {result.bundle}", *(f"{key.ljust(width)}  {value}" for key, value in result.summary)])
