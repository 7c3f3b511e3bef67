"""`oodserve fit DATA --backbone MODEL.onnx`: OOD detection in the feature space of the classifier a team already serves.

Steps (design.md section 10):
1. find the logits and feature tensors in the user's graph (`backbone_graph`), settle the declared preprocessing;
2. check the backbone's accuracy on a labelled slice of DATA first: a wrong mean, channel order or layout shows as
   near-chance accuracy, and the fit stops saying so with the accuracy it measured;
3. features and logits of the training images; the heads (`backbone_heads`) and a flow on PCA-whitened features,
   fitted on training features only;
4. calibration on images the backbone never trained on (`--calibration`, split into signal calibration, fusion
   calibration and validation). Without them the fit refuses: features of a network's own training images are
   tighter than those of unseen images, so scores calibrated on them are too small and the verdict's false-positive
   rate exceeds alpha (design.md section 10). `--calibrate-on-training-data` overrides this with a loud warning and
   the manifest records that the guarantee does not hold;
5. the fusion rule, chosen without OOD data on (a) self-made perturbations of the validation images (far-OOD-like) and
   (b) a near-OOD proxy from the training data itself: classes held out in turn (heads refitted without the class,
   its logit column dropped, its held-out images scored as pseudo-OOD);
6. one serving graph (preprocessing -> user's model -> heads) and a verified bundle, written to a staging directory
   that replaces OUT only when complete.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from oodserve.bundle.manifest import SCHEMA_VERSION
from oodserve.bundle.preprocess import BackboneSpec, PreprocessSpec, fit_to_size
from oodserve.bundle.writer import write_bundle, write_calibration
from oodserve.models.data import DataError, ImageDataset, load_image_dataset
from oodserve.models.fit.backbone_graph import BackboneError, BackboneGraph, check_preprocess, compose, default_preprocess, inspect_backbone
from oodserve.models.fit.backbone_heads import attach_flow, features_front, fit_heads, heads_model, score_heads
from oodserve.models.fit.summary import FitResult
from oodserve.models.flows.tabular import export_tabular_flow, train_tabular_flow
from oodserve.models.perturbations import make_perturbed_sets
from oodserve.scoring.conformal import conformal_p_values, sort_calibration_scores
from oodserve.scoring.fusion import fused_statistic
from oodserve.scoring.pipeline import FUSED_CALIBRATION_KEY

logger = logging.getLogger("oodserve.fit")

MODEL_NAME = "backbone"
MODEL_FILE = "backbone.onnx"
SIGNAL_SIGNS = {"knn_distance": 1.0, "mahalanobis": 1.0, "relative_mahalanobis": 1.0, "energy": 1.0, "max_logit": -1.0,
                "msp": -1.0, "vim": 1.0, "gp_variance": 1.0}
"""Head output -> sign making higher = more OOD."""
FUSION_CANDIDATES = tuple(SIGNAL_SIGNS)
"""The flow's signals are reported but not fused: the held-out-class proxy cannot refit a flow per class within the
budget, and a flow that saw the held-out class would be judged on data it was fitted to."""
PERTURBATIONS = ("gaussian_noise", "uniform_noise", "blurred", "colour_shifted", "cropped_zoomed", "pixel_shuffled", "inverted",
                 "rotated_90")
MIN_CALIBRATION = 300
MAX_PROXY_CLASSES = 5
ACCURACY_SLICE = 2000


@dataclass(frozen=True)
class BackboneOptions:
    """What `oodserve fit --backbone` controls besides the data."""

    backbone: Path
    calibration: Path | None = None
    features: str | None = None
    logits: str | None = None
    pooling: str | None = None
    preprocess: Mapping[str, Any] = field(default_factory=dict)
    calibrate_on_training_data: bool = False
    min_accuracy: float | None = None
    flow_seconds: float = 60.0
    threads: int = 2
    batch_size: int = 256
    work: Path | None = None
    """Where the features of the training and calibration images are cached (keyed by the model's and the data's hashes)."""


def parse_preprocess(items: Sequence[str]) -> dict[str, Any]:
    """`--preprocess` values: KEY=VALUE pairs (mean=0.485,0.456,0.406 size=224x224 layout=NHWC ...) or a JSON file."""
    try:
        return _parse_preprocess(items)
    except ValueError as error:
        if isinstance(error, DataError):
            raise
        raise DataError(f"--preprocess: {error}") from error


def _parse_preprocess(items: Sequence[str]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            path = Path(item)
            if not path.is_file():
                raise DataError(f"--preprocess {item!r}: expected KEY=VALUE or a JSON file")
            try:
                loaded = json.loads(path.read_text())
            except json.JSONDecodeError as error:
                raise DataError(f"{path}: not valid JSON: {error}") from error
            if not isinstance(loaded, dict):
                raise DataError(f"{path}: the preprocessing file must hold a JSON object")
            values.update(loaded)
            continue
        key, text = item.split("=", 1)
        key = key.strip().replace("-", "_")
        if key in ("mean", "std"):
            values[key] = [float(part) for part in text.split(",")]
        elif key == "size":
            parts = text.lower().split("x")
            if len(parts) != 2 or not all(part.isdigit() for part in parts):
                raise DataError(f"--preprocess size takes HxW, got {text!r}")
            values[key] = [int(parts[0]), int(parts[1])]
        elif key in ("scale", "crop_fraction"):
            values[key] = float(eval_fraction(text))
        elif key == "channels":
            values[key] = int(text)
        else:
            values[key] = text
    return values


def eval_fraction(text: str) -> float:
    """'0.0039', '1/255' -> float."""
    if "/" in text:
        numerator, denominator = text.split("/", 1)
        return float(numerator) / float(denominator)
    return float(text)


def settle_preprocess(graph: BackboneGraph, declared: Mapping[str, Any]) -> PreprocessSpec:
    """The model's own input facts overlaid with what the user declared; BackboneError when they disagree."""
    size = tuple(declared["size"]) if "size" in declared else None
    values = default_preprocess(graph, size if size is None else (int(size[0]), int(size[1])))
    values.update(declared)
    try:
        spec = PreprocessSpec.model_validate(values)
    except Exception as error:  # noqa: BLE001 - pydantic's ValidationError, reported with the flag name
        raise BackboneError(f"--preprocess: {error}") from error
    check_preprocess(graph, spec)
    return spec


def load_images_for(path: Path, spec: PreprocessSpec, what: str) -> ImageDataset:
    """Images at `path` brought to the model's size (the declared resize, as the server applies it) with the model's channels."""
    try:
        data = load_image_dataset(path)
    except DataError as error:
        if "pixels" not in str(error) and "different sizes" not in str(error):
            raise
        data = _load_any_size(path, spec)
    images = data.images
    if images.shape[1] != spec.channels:
        raise DataError(f"{what} {path}: images have {images.shape[1]} channel(s), the model's input "
                        f"{spec.input_name!r} takes {spec.channels}")
    if tuple(images.shape[2:]) != tuple(spec.size):
        if spec.resize == "none":
            raise DataError(f"{what} {path}: images are {images.shape[2]}x{images.shape[3]}, the model takes "
                            f"{spec.size[0]}x{spec.size[1]}; declare --preprocess resize=resize (or center_crop)")
        images = np.stack([fit_to_size(image, spec) for image in images])
    return ImageDataset(images, data.labels, data.class_names, data.source)


def _load_any_size(path: Path, spec: PreprocessSpec) -> ImageDataset:
    """A folder of class folders (or a flat folder) of PNG/JPEG images of any sizes, each brought to the model's size
    by the declared resize as it is read (the server applies the same code to image bodies)."""
    from PIL import Image, UnidentifiedImageError

    if not path.is_dir():
        raise DataError(f"{path}: images of this size are read from folders of PNG/JPEG files; give arrays at the model's size")
    if spec.resize == "none":
        raise DataError(f"{path}: images are not {spec.size[0]}x{spec.size[1]} pixels (the model's size); declare --preprocess "
                        "resize=resize (or center_crop)")

    def files(folder: Path) -> list[Path]:
        return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in (".png", ".jpg", ".jpeg"))

    folders = sorted(child for child in path.iterdir() if child.is_dir() and files(child))
    groups = [files(folder) for folder in folders] if folders else [files(path)]
    images = np.empty((sum(len(group) for group in groups), spec.channels, *spec.size), np.uint8)
    index = 0
    for group in groups:
        for file in group:
            try:
                with Image.open(file) as picture:
                    pixels = np.asarray(picture.convert("RGB" if spec.channels == 3 else "L"), dtype=np.uint8)
            except (UnidentifiedImageError, OSError) as error:
                raise DataError(f"{file}: not a readable PNG or JPEG image: {error}") from error
            planar = pixels[None] if pixels.ndim == 2 else np.moveaxis(pixels, -1, 0)
            images[index] = fit_to_size(planar, spec)
            index += 1
    labels = np.repeat(np.arange(len(groups)), [len(group) for group in groups]) if folders else None
    return ImageDataset(images, labels, [folder.name for folder in folders] if folders else None, str(path))


class BaseGraph:
    """The composed graph without heads (preprocessing + user's model) in onnxruntime: features and logits of raw images."""

    def __init__(self, graph: BackboneGraph, spec: PreprocessSpec, threads: int, batch_size: int) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        model = compose(graph, spec, None)
        try:
            self.session = ort.InferenceSession(model.SerializeToString(), sess_options=options, providers=["CPUExecutionProvider"])
        except Exception as error:  # noqa: BLE001
            raise BackboneError(f"{graph.path}: onnxruntime cannot run the model: {error}") from error
        self.batch_size = batch_size

    def cached(self, images: np.ndarray, work: Path | None, key: str) -> tuple[np.ndarray, np.ndarray]:
        """`run`, with the result kept in `work/features-<key>-<hash of the images>.npz` when `work` is given."""
        if work is None:
            return self.run(images)
        digest = hashlib.sha256(np.ascontiguousarray(images).data).hexdigest()[:16]
        path = work / f"features-{key}-{digest}.npz"
        if path.is_file():
            with np.load(path, allow_pickle=False) as archive:
                return archive["features"], archive["logits"]
        features, logits = self.run(images)
        work.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as handle:
            np.savez(handle, features=features, logits=logits)
        return features, logits

    def run(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """images (N, C, H, W) raw -> features (N, D) float32, logits (N, K) float32."""
        features, logits = [], []
        for start in range(0, len(images), self.batch_size):
            batch = np.ascontiguousarray(images[start:start + self.batch_size], dtype=np.float32)
            values = dict(zip(("features", "logits"), self.session.run(["features", "logits"], {"x": batch})))
            features.append(values["features"])
            logits.append(values["logits"])
        if not features:
            return np.zeros((0, 0), np.float32), np.zeros((0, 0), np.float32)
        return np.concatenate(features), np.concatenate(logits)


def check_accuracy(base: BaseGraph, data: ImageDataset, classes: int, minimum: float | None, rng: np.random.Generator) -> float | None:
    """Accuracy of the backbone on a labelled slice; DataError when near chance (wrong mean/std, channel order or layout)."""
    if data.labels is None:
        return None
    chosen = np.sort(rng.choice(len(data.images), size=min(ACCURACY_SLICE, len(data.images)), replace=False))
    _, logits = base.run(data.images[chosen])
    accuracy = float(np.mean(logits.argmax(axis=1) == data.labels[chosen]))
    chance = 1.0 / classes
    threshold = chance + 0.25 * (1.0 - chance) if minimum is None else minimum
    if accuracy < threshold:
        raise DataError(
            f"the backbone's accuracy on {len(chosen)} labelled training images is {accuracy:.3f} (chance {chance:.3f}, required "
            f"{threshold:.3f}): the declared preprocessing probably does not match how the model was trained (mean/std, scale, "
            "channel order or layout), or the class folders are not in the logits' order; fix --preprocess, or pass --min-accuracy 0 "
            "if the model really is this weak"
        )
    return accuracy


def signals_from_heads(outputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Signal values (higher = more OOD) from head outputs."""
    return {name: sign * np.asarray(outputs[name], dtype=np.float64).reshape(-1) for name, sign in SIGNAL_SIGNS.items()}


@dataclass(frozen=True)
class FusionChoice:
    method: str
    signals: tuple[str, ...]
    objective: float
    near: dict[str, float]
    far: dict[str, float]
    ranked: list[dict[str, Any]]


def choose_backbone_fusion(sets: Mapping[str, tuple[str, Mapping[str, np.ndarray], Mapping[str, np.ndarray]]],
                           candidates: Sequence[str] = FUSION_CANDIDATES) -> FusionChoice:
    """Best (method, signals) by mean near-proxy AUROC + mean far (perturbation) AUROC + worst set's AUROC.

    sets: name -> (group "near" or "far", in-distribution p-values by signal, pseudo-OOD p-values by signal)."""
    results = []
    for size in range(1, len(candidates) + 1):
        for subset in itertools.combinations(candidates, size):
            for method in ("fisher", "min_p") if size > 1 else ("fisher",):
                areas = {name: auroc(fused_statistic(method, inside, subset), fused_statistic(method, outside, subset))
                         for name, (_, inside, outside) in sets.items()}
                near = {n: a for n, a in areas.items() if sets[n][0] == "near"}
                far = {n: a for n, a in areas.items() if sets[n][0] == "far"}
                objective = (float(np.mean(list(near.values()))) if near else 0.0) + (float(np.mean(list(far.values()))) if far else 0.0) \
                    + min(areas.values())
                results.append((objective, method, subset, near, far))
    results.sort(key=lambda item: (-round(item[0], 4), len(item[2])))
    best = results[0]
    ranked = [{"method": m, "signals": list(s), "objective": round(o, 4),
               "near_mean": round(float(np.mean(list(n.values()))), 4) if n else None,
               "far_mean": round(float(np.mean(list(f.values()))), 4) if f else None} for o, m, s, n, f in results[:5]]
    return FusionChoice(best[1], best[2], best[0], best[3], best[4], ranked)


def auroc(inside: np.ndarray, outside: np.ndarray) -> float:
    """Area under the ROC curve of scores (higher = more OOD), ties counted half: the Mann-Whitney statistic from average
    ranks (what sklearn's roc_auc_score gives, without its input validation, which dominated the fusion search)."""
    values = np.concatenate([inside, outside])
    order = np.argsort(values, kind="mergesort")
    ordered = values[order]
    ranks = np.empty(len(values))
    starts = np.r_[0, np.flatnonzero(np.diff(ordered)) + 1]
    ends = np.r_[starts[1:], len(values)]
    average = (starts + ends + 1) / 2.0  # 1-based average rank of each run of ties
    ranks[order] = np.repeat(average, ends - starts)
    positives = len(outside)
    return float((ranks[len(inside):].sum() - positives * (positives + 1) / 2.0) / (positives * len(inside)))


def _p_values(calibration: Mapping[str, np.ndarray], signals: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {name: conformal_p_values(calibration[name], values) for name, values in signals.items()}


def proxy_sets(train_features: np.ndarray, train_logits: np.ndarray, train_labels: np.ndarray, calibration_features: np.ndarray,
               calibration_logits: np.ndarray, calibration_labels: np.ndarray, validation_features: np.ndarray,
               validation_logits: np.ndarray, validation_labels: np.ndarray, classes: int, seed: int,
               ) -> dict[str, tuple[str, dict[str, np.ndarray], dict[str, np.ndarray]]]:
    """Near-OOD proxy: for held-out classes c in turn, heads refitted without c (its logit column dropped), p-values of
    validation images of the other classes (in) and of class c (pseudo-OOD) against calibration images of the others."""
    rng = np.random.default_rng(seed)
    present = [c for c in range(classes) if np.sum(validation_labels == c) >= 10 and np.sum(train_labels == c) > 0]
    held_out = sorted(rng.choice(present, size=min(MAX_PROXY_CLASSES, len(present)), replace=False).tolist()) if len(present) > 2 else []
    sets: dict[str, tuple[str, dict[str, np.ndarray], dict[str, np.ndarray]]] = {}
    for held in held_out:
        keep = np.array([c for c in range(classes) if c != held])
        remap = np.full(classes, -1)
        remap[keep] = np.arange(len(keep))
        rows = train_labels != held
        fit = fit_heads(train_features[rows], train_logits[rows][:, keep], remap[train_labels[rows]], seed=seed, gp_features=256)

        def signals(features: np.ndarray, logits: np.ndarray, fit: Any = fit, keep: np.ndarray = keep) -> dict[str, np.ndarray]:
            return signals_from_heads(score_heads(fit, features, logits[:, keep]))

        calibration_rows = calibration_labels != held
        reference = {name: sort_calibration_scores(values)
                     for name, values in signals(calibration_features[calibration_rows], calibration_logits[calibration_rows]).items()}
        inside = validation_labels != held
        sets[f"held_out_class_{held}"] = (
            "near",
            _p_values(reference, signals(validation_features[inside], validation_logits[inside])),
            _p_values(reference, signals(validation_features[~inside], validation_logits[~inside])),
        )
    return sets


def train_flow(pca_train: np.ndarray, seconds: float, seed: int) -> onnx.ModelProto | None:
    """A tabular affine-coupling flow on PCA-whitened training features, exported as ONNX (`x` (N, p) -> `log_prob`)."""
    if pca_train.shape[1] < 2 or seconds <= 0:
        return None


    rng = np.random.default_rng(seed)
    order = rng.permutation(len(pca_train))
    validation = max(200, len(order) // 20)
    fit = train_tabular_flow(pca_train[order[validation:]], pca_train[order[:validation]], seconds, seed=seed)
    dimension = pca_train.shape[1]
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "flow.onnx"
        export_tabular_flow(fit.flow, np.arange(dimension), np.zeros(dimension), np.ones(dimension), dimension, path)
        return onnx.load(str(path))


DUPLICATE_WARNING = 0.01
DUPLICATE_REFUSAL = 0.5


def duplicate_share(held: np.ndarray, train: np.ndarray, tolerance: float = 1e-5) -> float:
    """Share of held-out feature rows (N, D) equal, up to `tolerance` relative distance, to some training row: the
    calibration set's images were trained on (or copied from the training set)."""
    if len(held) == 0:
        return 0.0
    train64 = train.astype(np.float64)
    train_norms = (train64**2).sum(axis=1)
    found = 0
    for start in range(0, len(held), 1024):
        block = held[start:start + 1024].astype(np.float64)
        norms = (block**2).sum(axis=1)
        distances = np.maximum(norms[:, None] - 2 * block @ train64.T + train_norms[None, :], 0.0).min(axis=1)
        found += int(np.sum(distances <= (tolerance**2) * np.maximum(norms, 1e-12)))
    return found / len(held)


def split_calibration(count: int, labels: np.ndarray | None, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(signal calibration, fusion calibration, validation) indices: 40% / 40% / 20%, stratified by label when given."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(count)
    if labels is not None:
        ranks = np.empty(count)
        for label in np.unique(labels):
            members = order[labels[order] == label]
            ranks[members] = (np.arange(len(members)) + rng.random()) / len(members)
        order = order[np.argsort(ranks[order], kind="stable")]
    # the stratified order interleaves the classes, so contiguous blocks keep their proportions
    signal, fusion, validation = np.split(order, [round(0.4 * count), round(0.8 * count)])
    return np.sort(signal), np.sort(fusion), np.sort(validation)


def fit_backbone(data_path: Path, out: Path, options: BackboneOptions, *, name: str, seed: int = 0,
                 default_alpha: float = 0.05) -> FitResult:
    """Fit a backbone bundle into `out` (replaced only once complete); see the module docstring."""
    started = time.perf_counter()
    timings: dict[str, float] = {}
    graph = inspect_backbone(options.backbone, options.features, options.logits, options.pooling)
    spec = settle_preprocess(graph, options.preprocess)
    if options.calibration is None and not options.calibrate_on_training_data:
        raise DataError(
            "no --calibration data: the conformal verdict must be calibrated on images the backbone never trained on (its features "
            "of its own training images are tighter, so the false-positive rate would exceed alpha). Give --calibration with the "
            f"team's validation split (at least {MIN_CALIBRATION} images; 2,000 or more for alpha 0.01 with room to spare), or "
            "--calibrate-on-training-data to fit anyway without the guarantee"
        )
    train = load_images_for(data_path, spec, "training data")
    held = load_images_for(options.calibration, spec, "calibration data") if options.calibration is not None else None
    for dataset in (train, held):
        if dataset is not None and dataset.class_names is not None and len(dataset.class_names) != graph.classes:
            raise DataError(f"{dataset.source}: {len(dataset.class_names)} classes {dataset.class_names[:12]}, the logits "
                            f"{graph.logits!r} have {graph.classes} columns; the labels must match the logits' width (class folders "
                            "sorted by name in the logits' order)")
    timings["load"] = time.perf_counter() - started
    rng = np.random.default_rng(seed)
    base = BaseGraph(graph, spec, options.threads, options.batch_size)
    accuracy = check_accuracy(base, train, graph.classes, options.min_accuracy, rng)
    mark = time.perf_counter()
    cache_key = hashlib.sha256(f"{graph.sha256} {spec.model_dump_json()} {graph.features} {graph.pooling}".encode()).hexdigest()[:16]
    train_features, train_logits = base.cached(train.images, options.work, cache_key)
    timings["train features"] = time.perf_counter() - mark
    train_labels = train.labels if train.labels is not None else train_logits.argmax(axis=1)
    guarantee = True
    if held is None:
        logger.warning("CALIBRATING ON TRAINING IMAGES (--calibrate-on-training-data): the false-positive rate of the verdict is NOT "
                       "guaranteed; scores of unseen in-distribution images run larger than on the images the backbone trained on")
        guarantee = False
        order = rng.permutation(len(train.images))
        reserved = order[: max(MIN_CALIBRATION, min(len(order) // 5, 10000))]
        fit_rows = np.setdiff1d(np.arange(len(order)), reserved)
        held_images = train.images[reserved]
        held_labels = train.labels[reserved] if train.labels is not None else None
        held_features, held_logits = train_features[reserved], train_logits[reserved]
        train_features, train_logits, train_labels = train_features[fit_rows], train_logits[fit_rows], train_labels[fit_rows]
    else:
        if len(held.images) < MIN_CALIBRATION:
            raise DataError(f"{held.source}: {len(held.images)} calibration images; at least {MIN_CALIBRATION} are needed "
                            "(40% calibrate the signals, 40% the fused verdict, 20% choose the fusion)")
        held_images, held_labels = held.images, held.labels
        mark = time.perf_counter()
        held_features, held_logits = base.cached(held_images, options.work, cache_key)
        timings["calibration features"] = time.perf_counter() - mark
    duplicates = duplicate_share(held_features, train_features) if held is not None else None
    if duplicates is not None and duplicates > DUPLICATE_REFUSAL and not options.calibrate_on_training_data:
        raise DataError(f"{held.source if held else ''}: {duplicates:.0%} of the calibration images have the features of a training "
                        "image: the calibration set looks like training data, on which the FPR guarantee does not hold; give "
                        "held-out images (or --calibrate-on-training-data to fit anyway without the guarantee)")
    if duplicates is not None and duplicates > DUPLICATE_WARNING:
        logger.warning("%.1f%% of the calibration images duplicate a training image's features; the FPR on new images will run "
                       "above alpha by up to about that share", 100 * duplicates)
    held_predicted = held_logits.argmax(axis=1)
    held_accuracy = float(np.mean(held_predicted == held_labels)) if held_labels is not None else None
    held_classes = held_labels if held_labels is not None else held_predicted
    signal_rows, fusion_rows, validation_rows = split_calibration(len(held_images), held_classes, seed)
    mark = time.perf_counter()
    heads = fit_heads(train_features, train_logits, train_labels, seed=seed)
    timings["heads"] = time.perf_counter() - mark
    opset = max(17, next((e.version for e in graph.model.opset_import if e.domain in ("", "ai.onnx")), 17))
    ir_version = max(graph.model.ir_version, 8)
    heads_graph = heads_model(heads, graph.feature_dimension, graph.classes, opset, ir_version)
    mark = time.perf_counter()
    pca_train = (train_features.astype(np.float64) - heads.pca_mean) @ heads.pca_projection
    flow = train_flow(pca_train, options.flow_seconds, seed)
    timings["flow"] = time.perf_counter() - mark
    if flow is not None:
        heads_graph = attach_flow(heads_graph, flow)
    head_session = ort.InferenceSession(heads_graph.SerializeToString(), providers=["CPUExecutionProvider"])
    head_names = [output.name for output in head_session.get_outputs()]

    def head_outputs(features: np.ndarray, logits: np.ndarray) -> dict[str, np.ndarray]:
        chunks: dict[str, list[np.ndarray]] = {name: [] for name in head_names}
        for start in range(0, len(features), 1024):  # the kNN similarities of a chunk: 1024 x bank rows
            values = head_session.run(head_names, {"features_in": features[start:start + 1024].astype(np.float32),
                                                   "logits_in": logits[start:start + 1024].astype(np.float32)})
            for output, value in zip(head_names, values):
                chunks[output].append(value)
        return {name: np.concatenate(parts) for name, parts in chunks.items()}

    reference_rows = rng.choice(len(train_features), size=min(len(train_features), 5000), replace=False)
    train_outputs = head_outputs(train_features[reference_rows], train_logits[reference_rows])
    plans: list[dict[str, Any]] = [
        {"name": signal, "kind": "model_output", "model": MODEL_NAME, "output": signal, "params": {"sign": sign}}
        for signal, sign in SIGNAL_SIGNS.items()
    ]
    if flow is not None:
        log_prob = train_outputs["flow_log_prob"].astype(np.float64)
        plans += [
            {"name": "flow_nll", "kind": "model_output", "model": MODEL_NAME, "output": "flow_log_prob", "params": {"sign": -1.0}},
            {"name": "flow_typicality", "kind": "model_output", "model": MODEL_NAME, "output": "flow_log_prob",
             "params": {"two_sided": True, "center": float(log_prob.mean()), "scale": float(log_prob.std() + 1e-12)}},
        ]

    def all_signals(features: np.ndarray, logits: np.ndarray) -> dict[str, np.ndarray]:
        outputs = head_outputs(features, logits)
        values = signals_from_heads(outputs)
        if flow is not None:
            log_prob = outputs["flow_log_prob"].astype(np.float64)
            values["flow_nll"] = -log_prob
            typicality = plans[-1]["params"]
            values["flow_typicality"] = np.abs(log_prob - typicality["center"]) / typicality["scale"]
        return values

    mark = time.perf_counter()
    per_signal = {name: sort_calibration_scores(values)
                  for name, values in all_signals(held_features[signal_rows], held_logits[signal_rows]).items()}
    validation_signals = all_signals(held_features[validation_rows], held_logits[validation_rows])
    validation_p = _p_values(per_signal, validation_signals)
    sets: dict[str, tuple[str, dict[str, np.ndarray], dict[str, np.ndarray]]] = {}
    for kind, perturbed in make_perturbed_sets(held_images[validation_rows], seed, list(PERTURBATIONS)).items():
        features, logits = base.run(perturbed)
        sets[kind] = ("far", validation_p, _p_values(per_signal, all_signals(features, logits)))
    proxy_labels = held_labels if held_labels is not None else held_predicted
    sets.update(proxy_sets(train_features, train_logits, train_labels, held_features[signal_rows], held_logits[signal_rows],
                           proxy_labels[signal_rows], held_features[validation_rows], held_logits[validation_rows],
                           proxy_labels[validation_rows], graph.classes, seed))
    choice = choose_backbone_fusion(sets)
    timings["fusion choice"] = time.perf_counter() - mark
    fusion_signals = all_signals(held_features[fusion_rows], held_logits[fusion_rows])
    fused = fused_statistic(choice.method, _p_values(per_signal, fusion_signals), choice.signals)
    staging = out.with_name(out.name + ".staging")
    if staging.exists():

        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    composed = compose(graph, spec, heads_graph)
    onnx.save_model(composed, str(staging / MODEL_FILE))
    write_calibration(staging / "calibration.npz", {**per_signal, FUSED_CALIBRATION_KEY: fused})
    output_names = [output.name for output in composed.graph.output]
    near_text = ", ".join(f"{k} {v:.3f}" for k, v in choice.near.items())
    far_text = ", ".join(f"{k} {v:.3f}" for k, v in choice.far.items())
    reason = (f"chosen without OOD data among fisher/min_p over subsets of {list(FUSION_CANDIDATES)} by mean near-proxy AUROC + mean "
              f"perturbation AUROC + worst set on {len(validation_rows)} held-out validation images; near proxy (classes held out in "
              f"turn, heads refitted without them): {near_text}; perturbations: {far_text}. Flow signals are reported, not fused "
              "(the proxy cannot refit a flow per class)")
    minimum_alpha = 1.0 / (len(fusion_rows) + 1)
    total = time.perf_counter() - started
    manifest_fields: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "name": name,
        "version": "1.0.0",
        "description": f"oodserve fit --backbone {graph.path.name}: OOD detection in its {graph.feature_dimension}-d features "
                       f"({graph.features}) and {graph.classes} logits",
        "input": {"shape": [spec.channels, *spec.size], "dtype": "uint8", "min": 0.0, "max": 255.0, "layout": "NCHW",
                  "resize": spec.resize, "crop_fraction": spec.crop_fraction},
        "labels": list(train.class_names) if train.class_names is not None else [str(c) for c in range(graph.classes)],
        "models": {MODEL_NAME: {"file": MODEL_FILE, "inputs": ["x"], "outputs": output_names}},
        "classifier": {"model": MODEL_NAME, "logits": "logits"},
        "signals": plans,
        "calibration": {"file": "calibration.npz"},
        "fusion": {"method": choice.method, "signals": list(choice.signals), "reason": reason},
        "default_alpha": max(default_alpha, minimum_alpha),
        "backbone": BackboneSpec(source_sha256=graph.sha256, source_name=graph.path.name, features=graph.features, pooling=graph.pooling,
                                 logits=graph.logits, feature_dimension=graph.feature_dimension, classes=graph.classes, preprocess=spec),
        "provenance": {
            "data": f"{train.source}: {len(train.images)} training images; calibration: "
                    + (f"{held.source}: {len(held.images)} images" if held is not None else "a held-back part of the TRAINING images"),
            "seed": seed,
            "code_version": _code_version(),
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "builder": "oodserve fit --backbone (models/fit/backbone.py)",
            "calibration_guarantee": guarantee,
            "backbone_accuracy_training_slice": accuracy,
            "backbone_accuracy_calibration": held_accuracy,
            "calibration_duplicates_of_training": duplicates,
            "splits": {"train": int(len(train_features)), "signal_calibration": int(len(signal_rows)),
                       "fusion_calibration": int(len(fusion_rows)), "validation": int(len(validation_rows))},
            "minimum_alpha": minimum_alpha,
            "heads": heads.figures,
            "fusion_candidates_top5": choice.ranked,
            "seconds": {**{k: round(v, 1) for k, v in timings.items()}, "total": round(total, 1)},
        },
    }
    manifest = write_bundle(staging, manifest_fields)
    features_bundle = _write_features_bundle(out, heads, heads_graph, manifest_fields, graph, opset, ir_version)
    if out.exists():

        shutil.rmtree(out)
    staging.rename(out)
    summary = [
        ("backbone", f"{graph.path} (sha256 {graph.sha256[:12]}...): features {graph.features} ({graph.feature_dimension}-d, pooling "
                     f"{graph.pooling}), logits {graph.logits} ({graph.classes} classes)"),
        ("preprocess", spec.model_dump_json()),
        ("data", f"{len(train.images)} training images, {len(held_images)} calibration images"
                 + ("" if guarantee else " (TRAINING images: FPR NOT guaranteed)")),
        ("accuracy", f"training slice {accuracy}, calibration {held_accuracy}"),
        ("fusion", f"{choice.method} over {list(choice.signals)}"),
        ("alpha", f"default {manifest.default_alpha:g}; minimum supported {minimum_alpha:.4f}"),
        ("seconds", ", ".join(f"{k} {v:.1f}" for k, v in {**timings, "total": total}.items())),
        ("features", f"clients that already have the {graph.feature_dimension}-d features post them to {features_bundle}"
         if features_bundle is not None else "no companion features bundle: the logits are not an affine map of the features"),
    ]
    return FitResult(out, summary, manifest.model_dump(mode="json"))


FEATURES_SUFFIX = "-features"
LOGIT_MAP_TOLERANCE = 1e-3


def _write_features_bundle(out: Path, heads: Any, heads_graph: onnx.ModelProto, fields: Mapping[str, Any], graph: BackboneGraph,
                           opset: int, ir_version: int) -> Path | None:
    """The companion vector bundle `OUT-features`: the same heads, signals, calibration and fusion, fed with the features
    (N, D) a client already has; the logits are recomputed from them by the fitted affine map, so it is written only when
    that map is exact (features that feed the logits' Gemm/MatMul directly). Returns its path, or None."""


    scale = max(1.0, float(np.abs(heads.logit_bias).max()))
    if heads.figures.get("logit_map_residual", np.inf) > LOGIT_MAP_TOLERANCE * scale:
        return None
    target = out.with_name(out.name + FEATURES_SUFFIX)
    staging = target.with_name(target.name + ".staging")
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    model = onnx.compose.merge_models(features_front(heads, opset, ir_version), heads_graph,
                                      io_map=[("features_out", "features_in"), ("logits_out", "logits_in")])
    onnx.save_model(model, str(staging / "heads.onnx"))
    shutil.copyfile(out.with_name(out.name + ".staging") / "calibration.npz", staging / "calibration.npz")
    dimension = graph.feature_dimension
    vector_fields = {
        **fields,
        "name": f"{fields['name']}{FEATURES_SUFFIX}",
        "description": f"{fields['description']}; this bundle takes the {dimension}-d features ({graph.features}) directly",
        "input": {"shape": [dimension], "dtype": "float32", "min": -3.0e38, "max": 3.0e38, "layout": "features",
                  "features": [f"f{index}" for index in range(dimension)]},
        "models": {"heads": {"file": "heads.onnx", "inputs": ["x"], "outputs": [o.name for o in model.graph.output]}},
        "classifier": {"model": "heads", "logits": "logits"},
        "signals": [{**signal, "model": "heads"} for signal in fields["signals"]],
        "backbone": None,
    }
    write_bundle(staging, vector_fields)
    if target.exists():
        shutil.rmtree(target)
    staging.rename(target)
    return target


def _code_version() -> str:
    import subprocess

    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"

