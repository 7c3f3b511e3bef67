"""`oodserve build-bundle`: the Fashion-MNIST case of `oodserve fit` (oodserve.models.fit.images) with the shipped
bundle's settings: Glow (3 levels x 8 steps, 64 channels), a mutation-trained background Glow and SNGP,
each for a fixed number of minutes (or from given checkpoints), calibrated on the held-out split every
trainer in this repository uses (`oodserve.models.splits.bundle_split`), so checkpoints trained with `oodserve train`
never saw the calibration images.

Data use (all from the in-distribution training file):
- `train` fits the models and the signal parameters (training entropy, level statistics, DDU Gaussians);
- `validation` early-stops training and, with its perturbed copies, chooses the fusion rule;
- `calibration` is never trained on: half calibrates each signal, the other half the fused statistic.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from oodserve.models.data import DEFAULT_FASHION_MNIST_DIR, FASHION_MNIST_LABELS, load_image_dataset
from oodserve.models.fit.images import REUSED_FILES, ImageFitOptions, fit_images
from oodserve.models.splits import bundle_split

EXPORT_AND_CALIBRATION_MINUTES = 15.0
"""Budget on top of the training minutes for export, calibration on 10,000 images and the fusion choice."""


@dataclass
class BuildSettings:
    """What `oodserve build-bundle` controls."""

    data: str = str(DEFAULT_FASHION_MNIST_DIR)
    out: str = "models/bundles/fashion-mnist"
    work: str = "runs/bundle"
    name: str = "fashion-mnist"
    version: str = "1.0.0"
    flow_checkpoint: str | None = None
    background_checkpoint: str | None = None
    sngp_checkpoint: str | None = None
    reuse_from: str | None = None
    """An earlier bundle directory whose exported `reuse` models are kept as they are instead of retrained."""
    reuse: tuple[str, ...] = ()
    flow_minutes: float = 40.0
    background_minutes: float = 20.0
    sngp_minutes: float = 25.0
    mutation_rate: float = 0.15
    background_weight_decay: float = 1e-4
    default_alpha: float = 0.05
    seed: int = 0
    threads: int = 2
    reference_size: int = 10000
    limit: int | None = None
    """Use at most this many images per set (quick smoke builds; the shipped bundle uses all)."""
    extra_provenance: dict[str, Any] = field(default_factory=dict)


def build_bundle(settings: BuildSettings) -> Path:
    """Build the bundle directory `settings.out` and return it."""
    unknown = sorted(set(settings.reuse) - set(REUSED_FILES))
    if unknown or (settings.reuse and not settings.reuse_from) or (settings.reuse_from and not settings.reuse):
        raise ValueError(f"reuse takes models of {sorted(REUSED_FILES)} together with reuse_from; got {list(settings.reuse)}")
    given_twice = sorted(stage for stage in settings.reuse if getattr(settings, f"{stage}_checkpoint"))
    if given_twice:
        raise ValueError(f"{given_twice}: give a checkpoint or reuse the earlier bundle's model, not both")
    data = load_image_dataset(settings.data, class_names=FASHION_MNIST_LABELS)
    split = bundle_split(len(data.images), seed=settings.seed)
    given = {"flow": settings.flow_checkpoint, "background": settings.background_checkpoint, "sngp": settings.sngp_checkpoint}
    stage_minutes = {"flow": settings.flow_minutes, "background": settings.background_minutes, "sngp": settings.sngp_minutes}
    options = ImageFitOptions(
        checkpoints={stage: Path(path) for stage, path in given.items() if path},
        reuse_bundle=Path(settings.reuse_from) if settings.reuse_from else None,
        reuse_models=tuple(settings.reuse),
        stage_minutes=stage_minutes,
        flow_preset="default",
        background_preset="small",
        mutation_rate=settings.mutation_rate,
        background_weight_decay=settings.background_weight_decay,
        limit=settings.limit,
        reference_size=settings.reference_size,
        threads=settings.threads,
        sngp_flip=True,
        sngp_epochs=None,  # as many as the SNGP minutes afford, timed on the data (at most sngp_epoch_cap)
        split=split,
        version=settings.version,
        description="Fashion-MNIST OOD detector: Glow flow + mutation-trained background flow + SNGP classifier, "
                    "conformal p-values per signal, fused into one calibrated verdict.",
        extra_provenance=settings.extra_provenance,
    )
    kept = set(options.checkpoints) | set(options.reuse_models)
    minutes = sum(minutes for stage, minutes in stage_minutes.items() if stage not in kept) + EXPORT_AND_CALIBRATION_MINUTES
    result = fit_images(data, Path(settings.out), name=settings.name, minutes=minutes, seed=settings.seed, work=Path(settings.work),
                        default_alpha=settings.default_alpha, options=options)
    fusion = result.manifest["fusion"]
    print(f"bundle written to {result.bundle}: fusion {fusion['method']} over {fusion['signals']}")
    return result.bundle
