"""Fit a tiny backbone bundle in seconds (the NHWC uint8 tiny backbone with a features output, PNG class folders for
training, an .npz for calibration)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from oodserve.models.fit.backbone import BackboneOptions, fit_backbone
from tests.helpers.backbones import coloured_images, tiny_backbone, write_class_folders


def tiny_backbone_bundle(directory: Path, layout: str = "NHWC", dtype: str = "uint8", head: str = "features_output",
                         preprocess: dict | None = None) -> Path:
    """Fit `directory/bundle` from a tiny backbone; returns the bundle path (the model is `directory/model.onnx`)."""

    directory.mkdir(parents=True, exist_ok=True)
    model = tiny_backbone(directory / "model.onnx", layout=layout, dtype=dtype, head=head)
    train, train_labels = coloured_images(900, seed=1)
    write_class_folders(directory / "train", train, train_labels)
    held, held_labels = coloured_images(700, seed=2)
    np.savez(directory / "calibration.npz", x=held, y=held_labels)
    options = BackboneOptions(backbone=model, calibration=directory / "calibration.npz", flow_seconds=2.0,
                              preprocess=preprocess or {}, threads=1)
    fit_backbone(directory / "train", directory / "bundle", options, name="tiny-backbone", seed=0)
    return directory / "bundle"
