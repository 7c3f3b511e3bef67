"""`oodserve eval`: score data sets through the serving engine and write the evaluation report."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from oodserve.engine import Engine
from oodserve.models.data import load_images
from oodserve.models.evaluation.report import ScoredSet, write_report
from oodserve.models.perturbations import make_perturbed_sets
from oodserve.runtime.sampler import png_grid
from oodserve.runtime.sessions import RuntimeOptions
from oodserve.scoring.pipeline import score_outputs
from oodserve.scoring.signals import softmax


@dataclass
class EvalSettings:
    """What `oodserve eval` controls."""

    bundle: str
    in_dist: str
    ood: dict[str, str] = field(default_factory=dict)
    out: str = "runs/eval"
    perturbations: bool = True
    limit: int | None = None
    batch_size: int = 250
    threads: int = 2


def score_images(engine: Engine, name: str, images: np.ndarray, labels: np.ndarray | None, batch_size: int) -> ScoredSet:
    """Run uint8 images (N, H, W) through the engine (same code path as the server) and collect arrays."""
    chunks = []
    probabilities = []
    classifier = engine.classifier_logits
    for start in tqdm(range(0, len(images), batch_size), desc=f"scoring {name}", unit="batch", leave=False):
        batch = images[start : start + batch_size].astype(np.float32).reshape(-1, *engine.manifest.input.shape)
        outputs = engine.runner.run(batch)
        chunks.append(score_outputs(engine.signal_definitions, engine.calibration, engine.fusion, outputs,
                                    batch.astype(np.float64), engine.default_alpha, classifier))
        if classifier is not None:
            probabilities.append(softmax(outputs[classifier.model][classifier.output]))
    signals = {key: np.concatenate([c.signals[key] for c in chunks]) for key in chunks[0].signals}
    extra = {"mean bits/dim": float(np.mean(signals["bits_per_dim"]))} if "bits_per_dim" in signals else {}
    return ScoredSet(
        name=name,
        signals=signals,
        score=np.concatenate([c.fused_score for c in chunks]),
        p_value=np.concatenate([c.fused_p_value for c in chunks]),
        class_probabilities=np.concatenate(probabilities) if probabilities else None,
        labels=labels,
        extra=extra,
    )


def evaluate(settings: EvalSettings) -> Path:
    """Score in-distribution, every named OOD set and (optionally) perturbations; write report.md."""
    engine = Engine.load(settings.bundle, RuntimeOptions(providers=("CPUExecutionProvider",), intra_op_threads=settings.threads))
    in_data = load_images(settings.in_dist, "test")
    limit = settings.limit
    in_images = in_data.images[:limit]
    in_labels = in_data.labels[:limit] if in_data.labels is not None else None
    in_set = score_images(engine, Path(settings.in_dist).name or "in-distribution", in_images, in_labels, settings.batch_size)
    ood_sets = [
        score_images(engine, name, load_images(path, "test").images[:limit], None, settings.batch_size)
        for name, path in settings.ood.items()
    ]
    if settings.perturbations:
        for name, images in make_perturbed_sets(in_images[:2000], seed=12345).items():
            ood_sets.append(score_images(engine, name, images, None, settings.batch_size))
    fusion = engine.manifest.fusion
    samples = []
    if engine.sampler is not None:
        Path(settings.out).mkdir(parents=True, exist_ok=True)
        (Path(settings.out) / "samples_t0.7.png").write_bytes(png_grid(engine.sampler.sample(64, 0.7, seed=0)))
        samples = ["", "Samples from the flow at temperature 0.7 (the sampling graph the server uses):", "",
                   "![samples](samples_t0.7.png)"]
    header = [
        f"Bundle version {engine.version}, code {engine.manifest.provenance.code_version}; "
        f"scored through `oodserve.engine.Engine` (the server's code path), alpha {engine.default_alpha}.",
        "",
        f"Signals fused: {', '.join(fusion.signals)} ({fusion.method}). Why: {fusion.reason}",
        *samples,
    ]
    path = write_report(Path(settings.out), engine.name, in_set, ood_sets,
                        f"{fusion.method} over {', '.join(fusion.signals)}", header)
    print(f"report written to {path}")
    return path
