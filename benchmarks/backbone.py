"""Backbone bundle benchmark: a user's CIFAR-10 ResNet-20 (../shared/models/resnet20-cifar10) fitted with
`oodserve fit --backbone`, scored on the held-out half of the CIFAR-10 test JPEGs and on OOD sets made here.

OOD sets (every image re-encoded as JPEG quality 75, 4:2:0, like the in-distribution copy, so no set is told apart by
compression artefacts): MNIST and Fashion-MNIST as RGB 32x32; uniform noise and smooth (blurred) noise; corruptions of
the evaluation half's images (covariate shift) at two strengths each: Gaussian blur, strong JPEG, low contrast,
pixelation.

Per set: AUROC of the fused verdict score beside the post-hoc baselines on the same features and logits in the same run,
as their papers define them (`paper_*`: MSP, energy, max-logit, Mahalanobis, relative Mahalanobis, KNN with all 50,000
training features and k = 50 (Sun et al. 2022), ViM), and each of the bundle's own signals; FPR of
the verdict at alpha 0.05 / 0.01 on the evaluation half with Clopper-Pearson 95% intervals; fit time (from the manifest);
serving cost of the whole bundle (preprocessing + backbone + heads + scoring, `Engine.score`) against the user's model
alone in onnxruntime (numpy preprocessing outside the timing) at batch 64 and 1, same threads.

    python -m benchmarks.backbone --bundle runs/backbone/resnet20-bundle --evaluation runs/backbone/eval \
        --train-features runs/backbone/resnet20-bundle.work/features-<key>-<hash>.npz --out benchmarks/results/backbone-resnet20
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from PIL import Image, ImageFilter
from sklearn.metrics import roc_auc_score

from oodserve.bundle.preprocess import apply_preprocess
from oodserve.datasets import load_images
from oodserve.engine import Engine
from oodserve.models.data import load_image_dataset
from oodserve.models.fit.backbone import FUSION_CANDIDATES, proxy_sets, split_calibration
from oodserve.models.fit.backbone import auroc as fast_auroc
from oodserve.models.fit.backbone_heads import fit_heads, score_heads
from oodserve.runtime.sessions import RuntimeOptions
from oodserve.scoring.fusion import fused_statistic
from oodserve.stats import clopper_pearson

BASELINES = ("msp", "energy", "max_logit", "mahalanobis", "relative_mahalanobis", "knn_distance", "vim")


def jpeg75(image: np.ndarray) -> np.ndarray:
    """(3, H, W) uint8 -> the same re-encoded as baseline JPEG quality 75 with 4:2:0 chroma (Pillow's defaults)."""
    buffer = io.BytesIO()
    Image.fromarray(np.moveaxis(image, 0, -1)).save(buffer, format="JPEG", quality=75, subsampling="4:2:0")
    buffer.seek(0)
    return np.moveaxis(np.asarray(Image.open(buffer).convert("RGB")), -1, 0)


def _pil(image: np.ndarray) -> Image.Image:
    return Image.fromarray(np.moveaxis(image, 0, -1))


def _array(picture: Image.Image) -> np.ndarray:
    return np.moveaxis(np.asarray(picture.convert("RGB")), -1, 0)


def greyscale_as_rgb32(images: np.ndarray) -> np.ndarray:
    """(N, 28, 28) uint8 -> (N, 3, 32, 32) uint8 (bilinear resize, grey copied to R, G, B)."""
    out = np.empty((len(images), 3, 32, 32), np.uint8)
    for index, image in enumerate(images):
        resized = np.asarray(Image.fromarray(image).resize((32, 32), Image.Resampling.BILINEAR))
        out[index] = resized[None]
    return out


def corrupt(images: np.ndarray, kind: str, strength: float) -> np.ndarray:
    """Covariate-shift corruptions of (N, 3, 32, 32) uint8 images."""
    out = np.empty_like(images)
    for index, image in enumerate(images):
        picture = _pil(image)
        if kind == "blur":
            picture = picture.filter(ImageFilter.GaussianBlur(radius=strength))
        elif kind == "jpeg":
            buffer = io.BytesIO()
            picture.save(buffer, format="JPEG", quality=int(strength))
            buffer.seek(0)
            picture = Image.open(buffer)
        elif kind == "contrast":
            values = image.astype(np.float32)
            mean = values.mean(axis=(1, 2), keepdims=True)
            picture = _pil(np.clip((values - mean) * strength + mean, 0, 255).astype(np.uint8))
        elif kind == "pixelate":
            side = int(strength)
            picture = picture.resize((side, side), Image.Resampling.BOX).resize((32, 32), Image.Resampling.NEAREST)
        out[index] = _array(picture)
    return out


def ood_sets(evaluation: np.ndarray, mnist_dir: Path, fashion_dir: Path, count: int, seed: int) -> dict[str, np.ndarray]:
    """name -> (count, 3, 32, 32) uint8, every image JPEG-75 re-encoded."""
    rng = np.random.default_rng(seed)
    chosen = evaluation[rng.choice(len(evaluation), size=min(count, len(evaluation)), replace=False)]
    sets: dict[str, np.ndarray] = {}
    sets["mnist"] = greyscale_as_rgb32(load_images(mnist_dir, "t10k").images[:count])
    if fashion_dir.exists():
        sets["fashion_mnist"] = greyscale_as_rgb32(load_images(fashion_dir, "t10k").images[:count])
    sets["uniform_noise"] = rng.integers(0, 256, (count, 3, 32, 32)).astype(np.uint8)
    sets["smooth_noise"] = corrupt(rng.integers(0, 256, (count, 3, 32, 32)).astype(np.uint8), "blur", 2.0)
    for kind, strengths in (("blur", (1.0, 2.0)), ("jpeg", (15, 5)), ("contrast", (0.4, 0.2)), ("pixelate", (16, 8))):
        for level, strength in zip(("mild", "strong"), strengths):
            sets[f"{kind}_{level}"] = corrupt(chosen, kind, float(strength))
    return {name: np.stack([jpeg75(image) for image in images]) for name, images in sets.items()}


def score_all(engine: Engine, images: np.ndarray, batch: int = 500) -> dict[str, np.ndarray]:
    """Signals, fused score and p-value of every image through the serving engine (N,) each, and the backbone's
    features and logits (N, D), (N, K) from the same run."""
    parts: dict[str, list[np.ndarray]] = {}
    for start in range(0, len(images), batch):
        chunk = images[start:start + batch].astype(np.float32)
        outputs = engine.runner.run(chunk)
        scores = engine.score_model_outputs(chunk, outputs)
        values = {**scores.signals, **{f"p:{name}": value for name, value in scores.p_values.items()},
                  "__fused_score__": scores.fused_score, "__fused_p__": scores.fused_p_value,
                  "__class__": scores.predicted_class, "__features__": outputs["backbone"]["features"],
                  "__logits__": outputs["backbone"]["logits"]}
        for name, value in values.items():
            parts.setdefault(name, []).append(np.asarray(value))
    return {name: np.concatenate(chunks) for name, chunks in parts.items()}


def auroc(inside: np.ndarray, outside: np.ndarray) -> float:
    return float(roc_auc_score(np.r_[np.zeros(len(inside)), np.ones(len(outside))], np.r_[inside, outside]))


def reference_baselines(train_features: np.ndarray, train_logits: np.ndarray, train_labels: np.ndarray) -> Any:
    """The post-hoc baselines as their papers define them, fitted on all training features: kNN with the full bank and
    k = 50 (Sun et al. 2022), Mahalanobis, relative Mahalanobis, ViM, MSP, energy, max-logit."""

    fit = fit_heads(train_features, train_logits, train_labels, knn_rows=len(train_features), gp_features=16)

    def score(features: np.ndarray, logits: np.ndarray) -> dict[str, np.ndarray]:
        values = score_heads(fit, features, logits)
        return {"msp": -values["msp"], "energy": values["energy"], "max_logit": -values["max_logit"],
                "mahalanobis": values["mahalanobis"], "relative_mahalanobis": values["relative_mahalanobis"],
                "knn_distance": values["knn_distance"], "vim": values["vim"]}

    return score


def proxy_agreement(in_scores: dict[str, np.ndarray], out_scores: dict[str, dict[str, np.ndarray]], train: tuple[np.ndarray, ...],
                    calibration: tuple[np.ndarray, ...], classes: int) -> dict[str, Any]:
    """Does the held-out-class proxy rank the fusion rules the way real sets do? For every rule (method, subset of the
    fusable signals) its mean AUROC on the proxy sets (recomputed as the fit does) and on the real sets of each group;
    Spearman correlation of the two rankings across rules, and the real AUROC of each ranking's top rule."""

    features, logits, labels = calibration
    signal_rows, _, validation_rows = split_calibration(len(features), labels, 0)
    proxies = proxy_sets(*train, features[signal_rows], logits[signal_rows], labels[signal_rows], features[validation_rows],
                         logits[validation_rows], labels[validation_rows], classes, 0)
    rules = [(method, subset) for size in range(1, len(FUSION_CANDIDATES) + 1)
             for subset in itertools.combinations(FUSION_CANDIDATES, size) for method in (("fisher", "min_p") if size > 1 else ("fisher",))]
    groups = {"corruptions": [n for n in out_scores if n.split("_")[0] in ("blur", "jpeg", "contrast", "pixelate")],
              "far": [n for n in out_scores if n.split("_")[0] not in ("blur", "jpeg", "contrast", "pixelate")]}
    inside_p = {name: in_scores[f"p:{name}"] for name in FUSION_CANDIDATES}
    table = []
    for method, subset in rules:
        proxy = float(np.mean([fast_auroc(fused_statistic(method, i, subset), fused_statistic(method, o, subset))
                               for _, i, o in proxies.values()]))
        inside = fused_statistic(method, inside_p, subset)
        real = {group: float(np.mean([fast_auroc(inside, fused_statistic(method, {k: out_scores[n][f"p:{k}"] for k in subset}, subset))
                                      for n in names])) for group, names in groups.items()}
        table.append((method, subset, proxy, real))

    def ranks(values: list[float]) -> np.ndarray:
        return np.argsort(np.argsort(values)).astype(float)

    proxy_values = [row[2] for row in table]
    result: dict[str, Any] = {"rules": len(table), "proxy_sets": list(proxies)}
    for group in groups:
        real_values = [row[3][group] for row in table]
        result[f"spearman_proxy_vs_{group}"] = float(np.corrcoef(ranks(proxy_values), ranks(real_values))[0, 1])
        best_real = max(table, key=lambda row: row[3][group])
        result[f"best_rule_on_{group}"] = {"rule": [best_real[0], list(best_real[1])], "auroc": best_real[3][group]}
    top = max(table, key=lambda row: row[2])
    result["proxy_top_rule"] = {"rule": [top[0], list(top[1])], "proxy_auroc": top[2], "real_auroc": top[3]}
    return result


def serving_cost(engine: Engine, user_model: Path, images: np.ndarray, threads: int, repeats: int) -> dict[str, Any]:
    """ms per image at batch 64 and p50 ms of single images: bundle (Engine.score) vs the user's model alone."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # as the engine's sessions
    user = ort.InferenceSession(str(user_model), sess_options=options, providers=["CPUExecutionProvider"])
    spec = engine.manifest.backbone.preprocess  # type: ignore[union-attr]
    name = user.get_inputs()[0].name
    result: dict[str, Any] = {"threads": threads}
    for batch in (64, 1):
        raw = images[:batch].astype(np.float32)
        prepared = apply_preprocess(raw, spec)
        for _ in range(5):
            user.run(None, {name: prepared})
            engine.score(raw)
        user_times, bundle_times = [], []
        for _ in range(repeats if batch == 64 else repeats * 10):  # interleaved, so both see the same machine load
            started = time.perf_counter()
            user.run(None, {name: prepared})
            user_times.append(time.perf_counter() - started)
            started = time.perf_counter()
            engine.score(raw)
            bundle_times.append(time.perf_counter() - started)
        user_ms, bundle_ms = np.asarray(user_times) * 1000, np.asarray(bundle_times) * 1000
        result[f"batch_{batch}"] = {
            "backbone_alone_ms_per_image_median": float(np.median(user_ms) / batch),
            "bundle_ms_per_image_median": float(np.median(bundle_ms) / batch),
            "ratio_of_medians": float(np.median(bundle_ms) / np.median(user_ms)),
            "backbone_alone_p50_ms": float(np.percentile(user_ms, 50)),
            "bundle_p50_ms": float(np.percentile(bundle_ms, 50)),
            "p50_difference_ms": float(np.percentile(bundle_ms, 50) - np.percentile(user_ms, 50)),
        }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--evaluation", type=Path, required=True, help="held-out in-distribution images never used to fit or calibrate")
    parser.add_argument("--user-model", type=Path, default=Path("../shared/models/resnet20-cifar10/model.onnx"))
    parser.add_argument("--mnist", type=Path, default=Path("../shared/data/mnist"))
    parser.add_argument("--fashion-mnist", type=Path, default=Path("/usr/share/datasets/fashion-mnist"))
    parser.add_argument("--train-features", type=Path, required=True,
                        help=".npz of the training images' features and logits (the fit's cache in OUT.work)")
    parser.add_argument("--train", type=Path, default=Path("runs/backbone/train"), help="training folder (for its labels)")
    parser.add_argument("--calibration-features", type=Path, help="the fit's cached calibration features (.npz): measure whether the "
                        "held-out-class proxy ranks fusion rules as the real sets do")
    parser.add_argument("--calibration", type=Path, default=Path("runs/backbone/cal"), help="calibration folder (for its labels)")
    parser.add_argument("--ood-count", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--out", type=Path, required=True, help="results path without suffix (.json and .md are written)")
    arguments = parser.parse_args()

    engine = Engine.load(arguments.bundle, RuntimeOptions(intra_op_threads=arguments.threads))
    evaluation = load_image_dataset(arguments.evaluation)
    in_scores = score_all(engine, evaluation.images)
    accuracy = float(np.mean(in_scores["__class__"] == evaluation.labels)) if evaluation.labels is not None else None
    sets = ood_sets(evaluation.images, arguments.mnist, arguments.fashion_mnist, arguments.ood_count, seed=0)
    signal_names = [signal.name for signal in engine.manifest.signals]
    with np.load(arguments.train_features, allow_pickle=False) as archive:
        train_features, train_logits = archive["features"], archive["logits"]
    train_labels = np.repeat(np.arange(10), [len(list(folder.iterdir())) for folder in sorted(arguments.train.iterdir())])
    assert len(train_labels) == len(train_features), "training labels and cached features disagree"
    baseline = reference_baselines(train_features, train_logits, train_labels)
    in_baselines = baseline(in_scores["__features__"], in_scores["__logits__"])
    rows = {}
    all_out: dict[str, dict[str, np.ndarray]] = {}
    for name, images in sets.items():
        out_scores = score_all(engine, images)
        all_out[name] = out_scores
        row = {"verdict": auroc(in_scores["__fused_score__"], out_scores["__fused_score__"])}
        out_baselines = baseline(out_scores["__features__"], out_scores["__logits__"])
        row.update({f"paper_{b}": auroc(in_baselines[b], out_baselines[b]) for b in BASELINES})
        row.update({signal: auroc(in_scores[signal], out_scores[signal]) for signal in signal_names})
        row["flagged_at_0.05"] = float(np.mean(out_scores["__fused_p__"] < 0.05))
        rows[name] = row
    fpr = {}
    for alpha in (0.05, 0.01):
        flagged = int(np.sum(in_scores["__fused_p__"] < alpha))
        low, high = clopper_pearson(flagged, len(evaluation.images))
        fpr[str(alpha)] = {"flagged": flagged, "n": len(evaluation.images), "fpr": flagged / len(evaluation.images),
                           "clopper_pearson_95": [low, high], "alpha_inside_interval": bool(low <= alpha <= high)}
    baselines = [f"paper_{b}" for b in BASELINES]
    mean = {column: float(np.mean([row[column] for row in rows.values()])) for column in ["verdict", *baselines, *signal_names]}
    best_baseline = max(baselines, key=lambda b: mean[b])
    worst_gap = min(rows[name]["verdict"] - max(rows[name][b] for b in baselines) for name in rows)
    provenance = engine.manifest.provenance.model_dump(mode="json")
    agreement = None
    if arguments.calibration_features is not None:
        with np.load(arguments.calibration_features, allow_pickle=False) as archive:
            calibration_features, calibration_logits = archive["features"], archive["logits"]
        calibration_labels = np.repeat(np.arange(10), [len(list(f.iterdir())) for f in sorted(arguments.calibration.iterdir())])
        agreement = proxy_agreement(in_scores, all_out, (train_features, train_logits, train_labels),
                                    (calibration_features, calibration_logits, calibration_labels), 10)
    cost = serving_cost(engine, arguments.user_model, evaluation.images, arguments.threads, arguments.repeats)
    results = {
        "bundle": str(arguments.bundle), "fusion": engine.manifest.fusion.model_dump(mode="json"),
        "evaluation_images": len(evaluation.images), "backbone_accuracy_evaluation": accuracy,
        "auroc": rows, "mean_auroc": mean, "best_baseline_by_mean": best_baseline,
        "verdict_minus_best_baseline_mean": mean["verdict"] - mean[best_baseline],
        "worst_set_verdict_minus_best_baseline_on_that_set": worst_gap,
        "fpr": fpr, "fit_seconds": provenance.get("seconds"), "serving_cost": cost, "proxy_agreement": agreement,
        "device": "CPU (onnxruntime CPUExecutionProvider)",
    }
    arguments.out.parent.mkdir(parents=True, exist_ok=True)
    arguments.out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    columns = ["verdict", *baselines, *signal_names]
    lines = [f"# Backbone bundle: {arguments.bundle.name}", "",
             f"fusion: {engine.manifest.fusion.method} over {engine.manifest.fusion.signals}", "",
             f"AUROC (in-distribution: {len(evaluation.images)} held-out CIFAR-10 test JPEGs; every OOD image re-encoded JPEG 75 "
             "4:2:0)", "",
             "| set | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for name, row in rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{row[c]:.3f}" for c in columns) + " |")
    lines.append("| **mean** | " + " | ".join(f"**{mean[c]:.3f}**" for c in columns) + " |")
    lines += ["", f"verdict mean - best baseline mean ({best_baseline}): {mean['verdict'] - mean[best_baseline]:+.4f}; worst set, "
              f"verdict - best baseline on that set: {worst_gap:+.4f}", ""]
    for alpha, values in fpr.items():
        lines.append(f"FPR at alpha {alpha}: {values['fpr']:.4f} ({values['flagged']}/{values['n']}), Clopper-Pearson 95% "
                     f"[{values['clopper_pearson_95'][0]:.4f}, {values['clopper_pearson_95'][1]:.4f}]")
    lines += ["", f"held-out-class proxy vs real sets (ranking of the fusion rules): {json.dumps(agreement)}"]
    lines += ["", f"fit seconds: {provenance.get('seconds')}", "", f"serving cost ({cost['threads']} threads, CPU): {json.dumps(cost)}"]
    arguments.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
