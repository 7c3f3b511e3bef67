"""The build path shared by bundles whose every signal comes from one exported flow (a hybrid i-ResNet, a
rectangular flow): the default bundle's data splits (`oodserve.models.splits.bundle_split`), export, signal fitting,
calibration and the label-free fusion choice (`oodserve.models.fit.images.calibrate_and_write`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from oodserve.models.build.calibrate import fresh_staging, publish_staging
from oodserve.models.data import FASHION_MNIST_LABELS, load_image_dataset
from oodserve.models.fit.budget import Budget
from oodserve.models.fit.fashion_mnist import EXPORT_AND_CALIBRATION_MINUTES
from oodserve.models.fit.images import BundleLayout, ImageFitOptions, calibrate_and_write, read_metrics
from oodserve.models.flows.base import Flow
from oodserve.models.flows.export import export_flow
from oodserve.models.splits import bundle_split

MODEL = "flow"
"""The one model's name in the manifest."""


def build_single_flow_bundle(checkpoint: Path, flow: Flow, stored: dict[str, Any], *, data: str, out: Path, name: str,
                             layout: BundleLayout, description: str, seed: int = 0, threads: int = 2, version: str = "1.0.0",
                             limit: int | None = None, reference_size: int = 10000, default_alpha: float = 0.05) -> Path:
    """Export `flow` (loaded from `checkpoint`, a `train flow` best.pt whose contents are `stored`), calibrate the layout's
    signals and write the bundle `out` (replaced only once complete). Refuses a checkpoint trained with another seed: its training split
    could hold this bundle's calibration images."""
    trained_seed = stored.get("settings", {}).get("seed", seed)
    if trained_seed != seed:
        raise ValueError(f"{checkpoint} was trained with seed {trained_seed}, this build splits with seed {seed}: "
                         "its training images could include this bundle's calibration images")
    dataset = load_image_dataset(data, class_names=FASHION_MNIST_LABELS)
    split = bundle_split(len(dataset.images), seed=seed)
    staging = fresh_staging(out)
    budget = Budget(EXPORT_AND_CALIBRATION_MINUTES * 60.0, reserve_fraction=1.0)
    with budget.timed("export"):
        flow_file, _ = export_flow(flow, staging / "flow.onnx")
    options = ImageFitOptions(limit=limit, reference_size=reference_size, threads=threads, split=split, version=version,
                              description=description)
    with budget.timed("calibration and fusion"):
        manifest = calibrate_and_write(dataset, staging, split, {MODEL: flow_file}, budget, options, name=name, seed=seed,
                                       default_alpha=default_alpha, training={MODEL: read_metrics(checkpoint)}, layout=layout)
    publish_staging(staging, out)
    fusion = manifest["fusion"]
    print(f"bundle written to {out}: fusion {fusion['method']} over {fusion['signals']}")
    return out
