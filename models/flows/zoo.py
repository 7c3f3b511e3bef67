"""Registry of flow families: how to build each from a config dict, and the size presets."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from oodserve.models.flows.base import Flow

PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "glow": {
        "tiny": {"levels": 3, "steps_per_level": 1, "hidden_channels": 8},
        "small": {"levels": 3, "steps_per_level": 4, "hidden_channels": 32},
        "default": {"levels": 3, "steps_per_level": 8, "hidden_channels": 64},
    },
    "nice": {
        "tiny": {"couplings": 2, "hidden_features": 16, "hidden_layers": 1},
        "small": {"couplings": 4, "hidden_features": 256, "hidden_layers": 3},
        "default": {"couplings": 4, "hidden_features": 400, "hidden_layers": 4},
    },
    "nsf": {
        "tiny": {"levels": 3, "steps_per_level": 1, "hidden_channels": 8, "bins": 4},
        "small": {"levels": 3, "steps_per_level": 3, "hidden_channels": 32, "bins": 8},
        "default": {"levels": 3, "steps_per_level": 4, "hidden_channels": 64, "bins": 8},
    },
    "iresnet": {
        "tiny": {"blocks_per_scale": 1, "scales": 2, "hidden_channels": 8, "training_terms": 2,
                 "inference_terms": 4, "inference_probes": 1, "inverse_iterations": 30},
        "small": {"blocks_per_scale": 2, "scales": 2, "hidden_channels": 32},
        "default": {"blocks_per_scale": 4, "scales": 2, "hidden_channels": 64},
    },
    "rectangular": {
        "tiny": {"manifold_dimension": 4, "couplings": 2, "hidden_features": 16, "hidden_layers": 1, "latent_couplings": 2,
                 "latent_hidden_features": 16},
        "small": {"manifold_dimension": 16, "couplings": 4, "hidden_features": 256, "latent_couplings": 4, "latent_hidden_features": 64},
        "default": {"manifold_dimension": 32, "couplings": 4, "hidden_features": 512, "latent_couplings": 6, "latent_hidden_features": 128},
    },
}


def _builders() -> dict[str, Callable[[dict[str, Any]], Flow]]:
    from oodserve.models.flows.glow import build_glow

    builders: dict[str, Callable[[dict[str, Any]], Flow]] = {"glow": build_glow}
    try:
        from oodserve.models.flows.nice import build_nice

        builders["nice"] = build_nice
    except ImportError:
        pass
    try:
        from oodserve.models.flows.nsf import build_nsf

        builders["nsf"] = build_nsf
    except ImportError:
        pass
    try:
        from oodserve.models.flows.iresnet import build_iresnet

        builders["iresnet"] = build_iresnet
    except ImportError:
        pass
    from oodserve.models.flows.rectangular import build_rectangular

    builders["rectangular"] = build_rectangular  # type: ignore[assignment]  # injective, not a Flow
    return builders


FAMILIES = ("nice", "glow", "nsf", "iresnet")
"""The bijective families; `rectangular` (oodserve.models.flows.rectangular) is injective and has its own tests and export."""


def preset_config(family: str, preset: str) -> dict[str, Any]:
    """The config dict of `family` at size `preset` (tiny / small / default)."""
    if family not in PRESETS:
        raise ValueError(f"unknown or unimplemented flow family {family!r}")
    return dict(PRESETS[family][preset])


def build_flow(family: str, config: dict[str, Any]) -> Flow:
    """Build an untrained flow of `family` from its config (as stored in a checkpoint). `config["classes"] = K > 0`
    adds a hybrid classifier head on the latent (`oodserve.models.flows.hybrid`) as `flow.classifier`."""
    builders = _builders()
    if family not in builders:
        raise ValueError(f"unknown or unimplemented flow family {family!r}; have {sorted(builders)}")
    config = dict(config)
    classes = int(config.pop("classes", 0) or 0)
    flow = builders[family](config)
    flow.family = family
    if classes:
        from oodserve.models.flows.hybrid import LatentClassifier

        flow.classifier = LatentClassifier(flow.dimension, classes)
    return flow
