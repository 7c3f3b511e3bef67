"""`make demo-bundle`: the closed-form Fashion-MNIST demo bundle (`oodserve.models.closed_form` models fitted in
seconds, numpy only), served by `make run` until a trained bundle exists.

`python -m oodserve.models.bundles.demo_builder --out models/bundles/demo` fits a per-pixel Gaussian density, a density of
mutated inputs (the likelihood-ratio background) and a linear Gaussian-process classifier on the
Fashion-MNIST training split, fits the signal parameters and calibrates them through the same path as
the trained builder (`oodserve.models.bundles.calibration`), and writes a verified bundle.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from oodserve.models.bundles.calibration import (
    SignalPlan,
    code_version,
    calibration_arrays,
    definitions_from_entries,
    fit_signals,
    p_values_against,
    write_signal_data,
)
from oodserve.models.closed_form import (
    INPUT_SHAPE,
    ModelParameters,
    fit_gaussian_density,
    fit_linear_gaussian_process,
    linear_gaussian_process_outputs,
    reference_outputs,
    save_models,
)
from oodserve.models.evaluation.metrics import auroc
from oodserve.models.perturbations import mutate_pixels
from oodserve.bundle.manifest import Manifest
from oodserve.bundle.writer import write_bundle
from oodserve.scoring.fusion import fused_statistic
from oodserve.scoring.pipeline import FusionRule, compute_signals


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
) -> Manifest:
    """Write the .onnx files, calibrate the (fitted) manifest `signals` on the two image splits (N, 1, 28, 28)
    or (N, 28, 28), and write calibration, parameter files and a verified manifest.json into `directory`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model_specs = save_models(directory, models)
    files = dict(parameter_files or {})
    definitions = definitions_from_entries(
        [{**entry, "params": {**entry.get("params", {}), **({"arrays": files[entry["params"]["parameters_file"]]} if "parameters_file" in entry.get("params", {}) else {})}} for entry in signals]
    )
    rule = FusionRule(method=fusion["method"], signals=tuple(fusion["signals"]))
    calibration = calibration_arrays(
        definitions,
        rule,
        (reference_outputs(models, signal_calibration_images), as_batch(signal_calibration_images)),
        (reference_outputs(models, fusion_calibration_images), as_batch(fusion_calibration_images)),
    )
    write_signal_data(directory, calibration, files)
    return write_bundle(
        directory,
        {
            "schema_version": 1,
            "name": name,
            "version": version,
            "description": description,
            "input": {"shape": list(INPUT_SHAPE), "dtype": "uint8", "min": 0, "max": 255, "layout": "NCHW"},
            "labels": list(labels) if labels is not None else None,
            "models": model_specs,
            "classifier": dict(classifier) if classifier is not None else None,
            "signals": [dict(signal) for signal in signals],
            "calibration": {"file": "calibration.npz"},
            "fusion": dict(fusion),
            "default_alpha": default_alpha,
            "provenance": dict(provenance)
            if provenance is not None
            else {"data": "synthetic", "seed": 0, "code_version": "test", "created": datetime.now(UTC).date().isoformat()},
        },
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
    SignalPlan("likelihood_ratio", "likelihood_ratio", "density", "log_prob", {"background_model": "background", "background_output": "log_prob"}),
    SignalPlan("input_complexity", "input_complexity", "density", "log_prob"),
    SignalPlan("gp_variance", "model_output", "classifier", "variance", {"sign": 1.0}),
    SignalPlan("max_softmax", "max_softmax", "classifier", "logits"),
]


def evaluate_signals(
    models: Mapping[str, ModelParameters],
    signals: Sequence[Mapping[str, Any]],
    fusion: Mapping[str, Any],
    calibration: Mapping[str, np.ndarray],
    in_distribution: np.ndarray,
    out_of_distribution: np.ndarray,
) -> dict[str, float]:
    """AUROC of every signal and of the fused statistic, in-distribution vs OOD images (N, 28, 28)."""
    definitions = definitions_from_entries(signals)
    scored = []
    for images in (in_distribution, out_of_distribution):
        values = compute_signals(definitions, reference_outputs(models, images), as_batch(images))
        p_values = p_values_against(calibration, {name: values[name] for name in fusion["signals"]})
        values["fused"] = fused_statistic(fusion["method"], p_values, fusion["signals"])
        scored.append(values)
    return {name: round(auroc(scored[0][name], scored[1][name]), 4) for name in scored[0]}


def build_fashion_mnist_demo(data_directory: Path, out: Path, seed: int = 0, ood_directory: Path | None = None) -> Manifest:
    """Fit the demo models on the Fashion-MNIST training split and write the bundle to `out`."""
    from oodserve.models.data import FASHION_MNIST_LABELS, bundle_split, load_images

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
    signals = fitted.manifest_entries
    fusion = {"method": "fisher", "signals": ["input_complexity", "gp_variance"], "reason": DEMO_FUSION_REASON}
    calibration_indices = split.calibration
    half = len(calibration_indices) // 2
    signal_images, fusion_images = train_set.images[calibration_indices[:half]], train_set.images[calibration_indices[half:]]
    test_set = load_images(data_directory, "test")
    evaluation: dict[str, Any] = {}
    if ood_directory is not None:
        count = 3000
        calibration = calibration_arrays(
            fitted.definitions,
            FusionRule(fusion["method"], tuple(fusion["signals"])),
            (reference_outputs(models, signal_images), as_batch(signal_images)),
            (reference_outputs(models, fusion_images), as_batch(fusion_images)),
        )
        evaluation = {
            "ood_data": f"first {count} of the Fashion-MNIST test file vs first {count} of the test file in {ood_directory}",
            "auroc": evaluate_signals(
                models, signals, fusion, calibration, test_set.images[:count], load_images(ood_directory, "test").images[:count]
            ),
        }
    accuracy = float(np.mean(np.argmax(linear_gaussian_process_outputs(classifier, test_set.images)["logits"], axis=1) == test_set.labels))
    return write_closed_form_bundle(
        out,
        models=models,
        signals=signals,
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
            "builder": "models/bundles/demo_builder.py",
            "classifier_test_accuracy": round(accuracy, 4),
            "evaluation": evaluation,
        },
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
