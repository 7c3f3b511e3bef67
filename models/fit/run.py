"""`oodserve fit`: read the data, pick the pipeline for its modality, print the summary table."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from models.data import DataError, is_vector_file, load_vectors
from models.fit.vectors import FitResult, fit_vectors

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


def bundle_name(settings: FitSettings) -> str:
    """--name, else the output directory's name made a valid bundle name."""
    name = settings.name or settings.out.name
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-._") or "bundle"
    return cleaned if cleaned[0].isalnum() else f"b{cleaned}"


def fit(settings: FitSettings) -> FitResult:
    """Fit a bundle for `settings.data` (feature vectors: .npy / .npz (N, D), CSV, Parquet)."""
    if settings.minutes <= 0:
        raise DataError(f"--minutes must be positive, got {settings.minutes:g}")
    if not settings.data.exists():
        raise DataError(f"{settings.data}: no such file or directory")
    if is_vector_file(settings.data):
        data = load_vectors(settings.data, settings.label_column, settings.labels)
        return fit_vectors(data, settings.out, name=bundle_name(settings), minutes=settings.minutes, seed=settings.seed,
                           work=settings.work, default_alpha=settings.default_alpha)
    raise DataError(
        f"{settings.data}: oodserve fit reads feature vectors (.npy / .npz of shape (N, D), .csv, .parquet); "
        "image data sets are built with `oodserve build-bundle` (28x28 greyscale IDX, .npy or PNG folders)"
    )


def format_summary(result: FitResult) -> str:
    """The summary rows as an aligned two-column table."""
    width = max(len(key) for key, _ in result.summary)
    return "\n".join([f"bundle {result.bundle}", *(f"{key.ljust(width)}  {value}" for key, value in result.summary)])
