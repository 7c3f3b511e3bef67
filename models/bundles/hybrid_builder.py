"""`oodserve build-bundle --hybrid`: a bundle whose every signal comes from one hybrid invertible ResNet
(`models.flows.hybrid`: a residual flow with a linear classifier head on its latent).

Signals: bits/dim (reported, never fused: Nalisnick et al. 2019), typicality and input complexity
(Serra et al. 2020) from the flow's log-density, 1 - max softmax from its head's logits, and the
class-conditional Gaussian density of its latent (DDU, Mukhoti et al. 2021; one shared covariance,
since the latent has as many dimensions as the image). The calibration, the fusion choice on self-made
perturbations and the data splits are the default bundle's (`models.bundles.builder`), so a checkpoint
trained by `oodserve train flow --hybrid` never saw the calibration images.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from models.bundles.calibration import SignalPlan
from models.bundles.builder import EXPORT_AND_CALIBRATION_MINUTES
from models.data import DEFAULT_FASHION_MNIST_DIR, FASHION_MNIST_LABELS, bundle_split, load_image_dataset
from models.fit.budget import Budget
from models.fit.images import FEATURE_DENSITY_FILE, BundleLayout, ImageFitOptions, _read_metrics, calibrate_and_write
from models.fit.splits import FitSplit

HYBRID_MODEL = "flow"
"""The one model of a hybrid bundle: outputs `log_prob`, `logits`, `features` (see `models.flows.export`)."""


def hybrid_signal_plans() -> list[SignalPlan]:
    """Every signal a hybrid bundle computes, all read from the one hybrid flow."""
    return [
        SignalPlan("bits_per_dim", "bits_per_dim", HYBRID_MODEL, "log_prob"),
        SignalPlan("typicality", "typicality", HYBRID_MODEL, "log_prob"),
        SignalPlan("input_complexity", "input_complexity", HYBRID_MODEL, "log_prob"),
        SignalPlan("max_softmax", "max_softmax", HYBRID_MODEL, "logits"),
        SignalPlan("feature_density", "feature_density", HYBRID_MODEL, "features",
                   {"parameters_file": FEATURE_DENSITY_FILE, "shared_covariance": True}),
    ]


@dataclass
class HybridBuildSettings:
    """What `oodserve build-bundle --hybrid` controls."""

    checkpoint: str | None = None
    """`oodserve train flow --hybrid` best.pt; None trains one (i-ResNet, `attention`) for `minutes` in `work`."""
    data: str = str(DEFAULT_FASHION_MNIST_DIR)
    out: str = "models/bundles/fashion-mnist-iresnet"
    work: str = "runs/bundle-hybrid"
    name: str = "fashion-mnist-iresnet"
    version: str = "1.0.0"
    minutes: float = 40.0
    attention: str = "none"
    nll_weight: float = 1.0
    default_alpha: float = 0.05
    seed: int = 0
    threads: int = 2
    reference_size: int = 10000
    limit: int | None = None


def _train(settings: HybridBuildSettings) -> Path:
    from models.flows.train import TrainSettings, train_flow

    out = Path(settings.work) / "flow"
    overrides = {"attention": settings.attention} if settings.attention != "none" else {}
    train_flow(TrainSettings(family="iresnet", data=settings.data, out=str(out), epochs=1000, max_minutes=settings.minutes,
                             threads=settings.threads, seed=settings.seed, patience=3, hybrid=True,
                             nll_weight=settings.nll_weight, overrides=overrides, limit_train=settings.limit))
    return out / "best.pt"


def build_hybrid_bundle(settings: HybridBuildSettings) -> Path:
    """Export the hybrid flow, calibrate its signals, choose the fusion and write the bundle `settings.out`."""
    from models.flows.export import export_checkpoint
    from models.flows.train import load_checkpoint_flow

    checkpoint = Path(settings.checkpoint) if settings.checkpoint else _train(settings)
    flow, stored = load_checkpoint_flow(checkpoint)
    if flow.classifier is None:
        raise ValueError(f"{checkpoint}: not a hybrid flow (train it with `oodserve train flow --hybrid`)")
    trained_seed = stored.get("settings", {}).get("seed", settings.seed)
    if trained_seed != settings.seed:
        raise ValueError(f"{checkpoint} was trained with seed {trained_seed}, this build splits with seed {settings.seed}: "
                         "its training images could include this bundle's calibration images")
    data = load_image_dataset(settings.data, class_names=FASHION_MNIST_LABELS)
    held_out = bundle_split(len(data.images), seed=settings.seed)
    halves = np.array_split(np.random.default_rng(settings.seed).permutation(held_out.calibration), 2)
    split = FitSplit(held_out.train, held_out.validation, np.sort(halves[0]), np.sort(halves[1]))
    out = Path(settings.out)
    staging = out.with_name(out.name + ".staging")
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    budget = Budget(EXPORT_AND_CALIBRATION_MINUTES * 60.0, reserve_fraction=1.0)
    with budget.timed("export"):
        flow_file, _ = export_checkpoint(checkpoint, staging / "flow.onnx")
    options = ImageFitOptions(limit=settings.limit, reference_size=settings.reference_size, threads=settings.threads,
                              split=split, version=settings.version,
                              description="Fashion-MNIST OOD detector from one hybrid invertible ResNet (density model and "
                                          "classifier at once): conformal p-values per signal, fused into one calibrated verdict.")
    layout = BundleLayout(plans=hybrid_signal_plans(), classifier_model=HYBRID_MODEL,
                          builder="oodserve build-bundle --hybrid (models/bundles/hybrid_builder.py)",
                          model_summary="hybrid i-ResNet (flow + linear classifier head)")
    with budget.timed("calibration and fusion"):
        manifest = calibrate_and_write(data, staging, split, {HYBRID_MODEL: flow_file}, budget, options, name=settings.name,
                                       seed=settings.seed, default_alpha=settings.default_alpha,
                                       training={HYBRID_MODEL: _read_metrics(checkpoint)}, layout=layout)
    if out.exists():
        shutil.rmtree(out)
    staging.rename(out)
    fusion = manifest["fusion"]
    print(f"bundle written to {out}: fusion {fusion['method']} over {fusion['signals']}")
    return out
