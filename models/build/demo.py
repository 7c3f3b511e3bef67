"""`make demo-bundle`: the closed-form Fashion-MNIST demo bundle (`oodserve.models.closed_form` models fitted in
seconds, numpy only), served by `make run` until a trained bundle exists.

`python -m oodserve.models.build.demo --out models/bundles/demo` fits a per-pixel Gaussian density, a density of
mutated inputs (the likelihood-ratio background) and a linear Gaussian-process classifier on the
Fashion-MNIST training split, fits the signal parameters and calibrates them through the one path every builder takes
(`oodserve.models.build.calibrate`), and writes a verified bundle.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from oodserve.bundle.manifest import ClassifierSpec, FusionSpec, InputSpec, Manifest, ModelSpec, Provenance
from oodserve.models.build.calibrate import BundleDescription, Calibrated, CalibrationSets, calibrate_and_write
from oodserve.models.build.signals import FittedSignals, SignalPlan, code_version, fit_signals, fitted_from_entries, p_values_against
from oodserve.models.closed_form import (
    INPUT_SHAPE,
    ModelParameters,
    fit_gaussian_density,
    fit_linear_gaussian_process,
    linear_gaussian_process_outputs,
    reference_outputs,
    save_models,
)
from oodserve.models.data import FASHION_MNIST_LABELS, load_images
from oodserve.models.evaluation.metrics import auroc
from oodserve.models.perturbations import mutate_pixels
from oodserve.models.splits import bundle_split
from oodserve.scoring.fusion import fused_statistic
from oodserve.scoring.pipeline import compute_signals


class ClosedFormModels:
    """The closed-form models run in numpy for the calibration (`oodserve.models.build.calibrate.BundleModels`): the same
    outputs their ONNX graphs compute, on images (N, 28, 28) or (N, 1, 28, 28)."""

    def __init__(self, models: Mapping[str, ModelParameters]) -> None:
        self.models = models

    def outputs(self, inputs: np.ndarray, what: str) -> dict[str, dict[str, np.ndarray]]:
        return reference_outputs(self.models, inputs)

    def signal_inputs(self, inputs: np.ndarray) -> np.ndarray:
        return as_batch(inputs)


def write_closed_form_bundle(
    directory: Path | str,
    *,
    models: Mapping[str, ModelParameters],
    signals: Sequence[Mapping[str, Any]],
    fusion: Mapping[str, Any],
    signal_calibration_images: np.ndarray,
    fusion_calibration_images: np.ndarray,
    classifier: Mapping[str, str] | None,
    labels: Sequence[str] | None,
    name: str = "demo",
    version: str = "0.0.1",
    description: str = "hand-made ONNX models with closed-form outputs",
    default_alpha: float = 0.05,
    provenance: Mapping[str, Any] | None = None,
    parameter_files: Mapping[str, Mapping[str, np.ndarray]] | None = None,
    evaluate: Callable[[Calibrated], dict[str, Any]] | None = None,
) -> Manifest:
    """Write the .onnx files, calibrate the (fitted) manifest `signals` on the two image splits (N, 1, 28, 28)
    or (N, 28, 28), and write calibration, parameter files and a verified manifest.json into `directory`;
    `evaluate`, given the calibration, returns the provenance's `evaluation`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model_specs = save_models(directory, models)

    def describe(calibrated: Calibrated) -> BundleDescription:
        recorded = (
            dict(provenance)
            if provenance is not None
            else {"data": "synthetic", "seed": 0, "code_version": "test", "created": datetime.now(UTC).date().isoformat()}
        )
        if evaluate is not None:
            recorded["evaluation"] = evaluate(calibrated)
        return BundleDescription(
            name=name,
            version=version,
            description=description,
            input=InputSpec(shape=list(INPUT_SHAPE), dtype="uint8", min=0, max=255, layout="NCHW"),
            labels=list(labels) if labels is not None else None,
            models={model: ModelSpec.model_validate(spec) for model, spec in model_specs.items()},
            classifier=ClassifierSpec.model_validate(classifier) if classifier is not None else None,
            default_alpha=default_alpha,
            provenance=Provenance.model_validate(recorded),
        )

    return calibrate_and_write(
        directory,
        ClosedFormModels(models),
        fitted_from_entries(signals, parameter_files or {}),
        CalibrationSets(signal=signal_calibration_images, fusion=fusion_calibration_images),
        FusionSpec.model_validate(fusion),
        describe,
    )


def as_batch(images: np.ndarray) -> np.ndarray:
    """Images (N, 28, 28) or (N, 1, 28, 28) as the (N, 1, 28, 28) float64 batch the signals score."""
    return np.asarray(images, dtype=np.float64).reshape(len(images), *INPUT_SHAPE)


DEMO_FUSION_REASON = (
    "input complexity corrects the density for how compressible an image is (raw likelihood and typicality of a "
    "per-pixel Gaussian are inverted on simpler images such as MNIST) and the linear-GP variance grows with distance "
    "from the training features; provenance.evaluation has each signal's AUROC"
)

DEMO_SIGNALS = [
    SignalPlan("bits_per_dim", "bits_per_dim", "density", "log_prob"),
    SignalPlan("typicality", "typicality", "density", "log_prob"),
    SignalPlan(
        "likelihood_ratio", "likelihood_ratio", "density", "log_prob", {"background_model": "background", "background_output": "log_prob"}
    ),
    SignalPlan("input_complexity", "input_complexity", "density", "log_prob"),
    SignalPlan("gp_variance", "model_output", "classifier", "variance", {"sign": 1.0}),
    SignalPlan("max_softmax", "max_softmax", "classifier", "logits"),
]


def evaluate_signals(
    models: Mapping[str, ModelParameters],
    fitted: FittedSignals,
    calibrated: Calibrated,
    in_distribution: np.ndarray,
    out_of_distribution: np.ndarray,
) -> dict[str, float]:
    """AUROC of every signal and of the fused statistic, in-distribution vs OOD images (N, 28, 28)."""
    fusion = calibrated.fusion
    scored = []
    for images in (in_distribution, out_of_distribution):
        values = compute_signals(fitted.definitions, reference_outputs(models, images), as_batch(images))
        p_values = p_values_against(calibrated.per_signal, {name: values[name] for name in fusion.signals})
        values["fused"] = fused_statistic(fusion.method, p_values, fusion.signals)
        scored.append(values)
    return {name: round(auroc(scored[0][name], scored[1][name]), 4) for name in scored[0]}


def build_fashion_mnist_demo(data_directory: Path, out: Path, seed: int = 0, ood_directory: Path | None = None) -> Manifest:
    """Fit the demo models on the Fashion-MNIST training split and write the bundle to `out`."""
    train_set = load_images(data_directory, "train")
    split = bundle_split(len(train_set.images), seed=seed)
    rng = np.random.default_rng(seed)
    train_images = train_set.images[split.train]
    train_labels = train_set.labels[split.train] if train_set.labels is not None else None
    if train_labels is None or train_set.labels is None:
        raise ValueError(f"{data_directory}: the demo bundle needs the training labels (train-labels-idx1-ubyte)")
    density = fit_gaussian_density(train_images, std_floor=1.0 / 64.0)
    background = fit_gaussian_density(mutate_pixels(train_images, rng, rate=0.2), std_floor=1.0 / 64.0)
    classifier = fit_linear_gaussian_process(
        train_images,
        train_labels,
        n_classes=len(FASHION_MNIST_LABELS),
        n_features=32,
        ridge=1.0,
        validation=(train_set.images[split.validation], train_set.labels[split.validation]),
    )
    models: dict[str, ModelParameters] = {"density": density, "background": background, "classifier": classifier}
    fitted = fit_signals(DEMO_SIGNALS, reference_outputs(models, train_images), as_batch(train_images), train_labels)
    fusion = {"method": "fisher", "signals": ["input_complexity", "gp_variance"], "reason": DEMO_FUSION_REASON}
    calibration_indices = split.calibration
    half = len(calibration_indices) // 2
    signal_images, fusion_images = train_set.images[calibration_indices[:half]], train_set.images[calibration_indices[half:]]
    test_set = load_images(data_directory, "test")

    def evaluate(calibrated: Calibrated) -> dict[str, Any]:
        if ood_directory is None:
            return {}
        count = 3000
        return {
            "ood_data": f"first {count} of the Fashion-MNIST test file vs first {count} of the test file in {ood_directory}",
            "auroc": evaluate_signals(
                models, fitted, calibrated, test_set.images[:count], load_images(ood_directory, "test").images[:count]
            ),
        }

    accuracy = float(np.mean(np.argmax(linear_gaussian_process_outputs(classifier, test_set.images)["logits"], axis=1) == test_set.labels))
    return write_closed_form_bundle(
        out,
        models=models,
        signals=fitted.manifest_entries,
        fusion=fusion,
        signal_calibration_images=signal_images,
        fusion_calibration_images=fusion_images,
        classifier={"model": "classifier", "logits": "logits"},
        labels=FASHION_MNIST_LABELS,
        parameter_files=fitted.parameter_files,
        name="fashion-mnist-demo",
        version="0.1.0",
        description=(
            "Demo bundle (not the trained one): per-pixel Gaussian density, mutated-input background density and a "
            "linear Gaussian-process classifier on 32 PCA features, fitted in closed form on Fashion-MNIST"
        ),
        provenance={
            "data": f"Fashion-MNIST training file at {data_directory}: models fitted on bundle_split(seed={seed}).train, "
            "calibrated on its calibration split (first half per signal, second half fused)",
            "seed": seed,
            "code_version": code_version(),
            "created": datetime.now(UTC).date().isoformat(),
            "builder": "models/build/demo.py",
            "classifier_test_accuracy": round(accuracy, 4),
        },
        evaluate=evaluate,
    )


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: build the Fashion-MNIST demo bundle."""
    parser = argparse.ArgumentParser(description="Build the closed-form Fashion-MNIST demo bundle.")
    parser.add_argument("--data", type=Path, default=Path("/usr/share/datasets/fashion-mnist"))
    parser.add_argument("--out", type=Path, default=Path("models/bundles/demo"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ood-data", type=Path, default=None, help="IDX directory of an OOD test set (for example MNIST)")
    arguments = parser.parse_args(argv)
    manifest = build_fashion_mnist_demo(arguments.data, arguments.out, arguments.seed, arguments.ood_data)
    print(f"wrote {arguments.out}: {sorted(manifest.files)}")


if __name__ == "__main__":
    main()
