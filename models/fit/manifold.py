"""`oodserve build-bundle --rectangular-checkpoint`: a bundle of manifold signals from one rectangular flow
(`oodserve.models.flows.rectangular`; Caterini et al. 2021).

Signals (higher = more OOD), all `model_output` of the flow's manifold graph:
- `manifold_density`: -log p(x_hat), the density on the learned manifold at the input's projection;
- `manifold_typicality`: |log p(x_hat) - mean| / sd over training images (the typicality view of Nalisnick
  et al. 2019 on the manifold: too likely is as suspect as too unlikely);
- `manifold_distance`: ||x - x_hat||, how far the input lies off the manifold (pixel levels);
- `distance_typicality`: the same two-sided standardisation of the distance.
Calibration, splits and the label-free fusion choice are every image bundle's (`oodserve.models.fit.single_flow`).
"""

from __future__ import annotations

from pathlib import Path

from oodserve.models.build.signals import SignalPlan
from oodserve.models.data import DEFAULT_FASHION_MNIST_DIR
from oodserve.models.fit.images import BundleLayout
from oodserve.models.fit.single_flow import MODEL, build_single_flow_bundle
from oodserve.models.flows.base import InjectiveFlow
from oodserve.models.flows.train import load_checkpoint_flow


def manifold_signal_plans() -> list[SignalPlan]:
    """The manifold signals of a rectangular flow's graph (outputs `log_prob`, `distance`)."""
    return [
        SignalPlan("manifold_density", "model_output", MODEL, "log_prob", {"sign": -1.0}),
        SignalPlan("manifold_typicality", "model_output", MODEL, "log_prob", {"two_sided": True}),
        SignalPlan("manifold_distance", "model_output", MODEL, "distance", {"sign": 1.0}),
        SignalPlan("distance_typicality", "model_output", MODEL, "distance", {"two_sided": True}),
    ]


def build_manifold_bundle(checkpoint: Path, out: Path, *, data: str = str(DEFAULT_FASHION_MNIST_DIR), name: str = "fashion-mnist-manifold",
                          seed: int = 0, threads: int = 2, limit: int | None = None, reference_size: int = 10000) -> Path:
    """Export a rectangular flow checkpoint, calibrate its manifold signals and write the bundle `out`."""
    flow, stored = load_checkpoint_flow(checkpoint)
    if not isinstance(flow, InjectiveFlow):
        raise ValueError(f"{checkpoint}: not a rectangular flow (train it with `oodserve train flow --family rectangular`)")
    layout = BundleLayout(plans=manifold_signal_plans(), classifier_model="none", latent_dimension=int(flow.latent_dimension),
                          batch_typicality=False, builder="oodserve build-bundle --rectangular-checkpoint (models/fit/manifold.py)",
                          model_summary=f"rectangular flow on a {flow.latent_dimension}-dimensional manifold")
    return build_single_flow_bundle(
        checkpoint, flow, stored, data=data, out=out, name=name, layout=layout, seed=seed, threads=threads, limit=limit,
        reference_size=reference_size,
        description="Fashion-MNIST OOD detector from a rectangular (injective) flow: density on a learned manifold and "
                    "distance to it, conformal p-values per signal, fused into one calibrated verdict.",
    )
