"""Registry of flow families: how to build each from a config dict, and the size presets."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from oodserve.models.flows.base import Flow
from oodserve.models.flows.glow import build_glow
from oodserve.models.flows.hybrid import LatentClassifier
from oodserve.models.flows.iresnet import build_iresnet
from oodserve.models.flows.nice import build_nice
from oodserve.models.flows.nsf import build_nsf
from oodserve.models.flows.rectangular import build_rectangular

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


BUILDERS: dict[str, Callable[[dict[str, Any]], Flow]] = {
    "glow": build_glow,
    "nice": build_nice,
    "nsf": build_nsf,
    "iresnet": build_iresnet,
    # injective, not a Flow: trained and exported through the same interface, its own capabilities checked by `InjectiveFlow`
    "rectangular": build_rectangular,  # type: ignore[dict-item]
}
"""family -> the function building an untrained model from its config dict."""


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
    if family not in BUILDERS:
        raise ValueError(f"unknown or unimplemented flow family {family!r}; have {sorted(BUILDERS)}")
    config = dict(config)
    classes = int(config.pop("classes", 0) or 0)
    flow = BUILDERS[family](config)
    flow.family = family
    if classes:
        flow.classifier = LatentClassifier(flow.dimension, classes)
    return flow
