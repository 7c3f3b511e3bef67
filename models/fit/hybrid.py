"""`oodserve build-bundle --hybrid`: a bundle whose every signal comes from one hybrid invertible ResNet
(`oodserve.models.flows.hybrid`: a residual flow with a linear classifier head on its latent).

Signals: bits/dim (reported, never fused: Nalisnick et al. 2019), typicality and input complexity
(Serra et al. 2020) from the flow's log-density, 1 - max softmax from its head's logits, and the
class-conditional Gaussian density of its latent (DDU, Mukhoti et al. 2021; one shared covariance,
since the latent has as many dimensions as the image). The calibration, the fusion choice on self-made
perturbations and the data splits are the default bundle's (`oodserve.models.fit.fashion_mnist`), so a checkpoint
trained by `oodserve train flow --hybrid` never saw the calibration images.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from oodserve.models.build.signals import SignalPlan
from oodserve.models.data import DEFAULT_FASHION_MNIST_DIR
from oodserve.models.fit.images import FEATURE_DENSITY_FILE, BundleLayout
from oodserve.models.fit.single_flow import MODEL, build_single_flow_bundle
from oodserve.models.flows.train import TrainSettings, load_checkpoint_flow, train_flow


def hybrid_signal_plans() -> list[SignalPlan]:
    """Every signal a hybrid bundle computes, all read from the one hybrid flow."""
    return [
        SignalPlan("bits_per_dim", "bits_per_dim", MODEL, "log_prob"),
        SignalPlan("typicality", "typicality", MODEL, "log_prob"),
        SignalPlan("input_complexity", "input_complexity", MODEL, "log_prob"),
        SignalPlan("max_softmax", "max_softmax", MODEL, "logits"),
        SignalPlan("feature_density", "feature_density", MODEL, "features",
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
    out = Path(settings.work) / "flow"
    overrides = {"attention": settings.attention} if settings.attention != "none" else {}
    train_flow(TrainSettings(family="iresnet", data=settings.data, out=str(out), epochs=1000, max_minutes=settings.minutes,
                             threads=settings.threads, seed=settings.seed, patience=3, hybrid=True,
                             nll_weight=settings.nll_weight, overrides=overrides, limit_train=settings.limit))
    return out / "best.pt"


def build_hybrid_bundle(settings: HybridBuildSettings) -> Path:
    """Export the hybrid flow, calibrate its signals, choose the fusion and write the bundle `settings.out`."""
    checkpoint = Path(settings.checkpoint) if settings.checkpoint else _train(settings)
    flow, stored = load_checkpoint_flow(checkpoint)
    if flow.classifier is None:
        raise ValueError(f"{checkpoint}: not a hybrid flow (train it with `oodserve train flow --hybrid`)")
    layout = BundleLayout(plans=hybrid_signal_plans(), classifier_model=MODEL,
                          builder="oodserve build-bundle --hybrid (models/fit/hybrid.py)",
                          model_summary="hybrid i-ResNet (flow + linear classifier head)")
    return build_single_flow_bundle(
        checkpoint, flow, stored, data=settings.data, out=Path(settings.out), name=settings.name, layout=layout, seed=settings.seed,
        threads=settings.threads, version=settings.version, limit=settings.limit, reference_size=settings.reference_size,
        default_alpha=settings.default_alpha,
        description="Fashion-MNIST OOD detector from one hybrid invertible ResNet (density model and classifier at once): "
                    "conformal p-values per signal, fused into one calibrated verdict.",
    )
