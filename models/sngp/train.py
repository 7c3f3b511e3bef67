"""Train the SNGP classifier on Fashion-MNIST (`split.train` only; `split.validation` for monitoring).

The GP precision matrix is reset at the start of every epoch and summed exactly over it (Liu et al. 2020,
Alg. 1). After the last epoch and the final spectral-norm refresh, a gradient-free eval-mode pass over
`split.train` sums it once more on the features the exported graph computes, so the covariance
`(ridge I + Phi^T Phi)^-1` matches inference (and an epoch the time budget cut short loses nothing).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from oodserve.models.data import DEFAULT_FASHION_MNIST_DIR, load_images
from oodserve.models.evaluation.metrics import expected_calibration_error  # noqa: F401 - re-exported for callers
from oodserve.models.nn.spectral import refresh_all_sigmas
from oodserve.models.sngp.backbone import SNGPClassifier, SNGPConfig
from oodserve.models.splits import bundle_split


@dataclass
class TrainSettings:
    """Optimisation settings (stored in checkpoints next to the model config)."""

    data_dir: str = str(DEFAULT_FASHION_MNIST_DIR)
    out_dir: str = "runs/sngp"
    epochs: int = 10
    """Epochs of the one-cycle schedule; 0 = as many as `max_minutes` affords (`epochs_for_budget`), at most `max_epochs`."""
    max_epochs: int = 30
    batch_size: int = 128
    learning_rate: float = 3e-3
    weight_decay: float = 5e-4
    seed: int = 0
    max_minutes: float = 25.0
    threads: int = 2
    flip: bool = True
    crop_padding: int = 0
    limit_train: int = 0  # use only the first N training images (smoke tests); 0 = all
    model: dict = field(default_factory=dict)


def augment(images: torch.Tensor, generator: torch.Generator, flip: bool, crop_padding: int) -> torch.Tensor:
    """Random horizontal flips and random crops after zero padding (in standardised units) on `(N, 1, H, W)`."""
    if flip:
        flip_mask = torch.rand(images.shape[0], generator=generator) < 0.5
        images = torch.where(flip_mask[:, None, None, None], images.flip(-1), images)
    if crop_padding > 0:
        size = images.shape[-1]
        padded = F.pad(images, [crop_padding] * 4, value=float(images.min()))
        offsets = torch.randint(0, 2 * crop_padding + 1, (images.shape[0], 2), generator=generator)
        images = torch.stack(
            [padded[i, :, r : r + size, c : c + size] for i, (r, c) in enumerate(offsets.tolist())]
        )
    return images


@torch.no_grad()
def predict(model: SNGPClassifier, images: torch.Tensor, batch_size: int = 1000) -> dict[str, np.ndarray]:
    """Eval-mode outputs for standardised `(N, 1, 28, 28)` images: logits, variance, mean-field, features."""
    model.eval()
    parts: dict[str, list[torch.Tensor]] = {"logits": [], "variance": [], "mean_field": [], "features": []}
    for start in range(0, images.shape[0], batch_size):
        logits, variance, mean_field, features = model(images[start : start + batch_size])
        for name, value in zip(parts, (logits, variance, mean_field, features)):
            parts[name].append(value)
    return {name: torch.cat(values).numpy() for name, values in parts.items()}


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


@torch.no_grad()
def precision_pass(model: SNGPClassifier, images: torch.Tensor, batch_size: int) -> None:
    """Gradient-free exact pass: `P = ridge I + sum Phi^T Phi` over `images` with the current weights."""
    model.eval()
    model.gp.reset_precision()
    for start in range(0, images.shape[0], batch_size):
        features = model.backbone(images[start : start + batch_size])
        model.gp.accumulate_precision(model.gp.random_features(features))


def training_step(
    model: SNGPClassifier, optimizer: torch.optim.Optimizer, images: torch.Tensor, labels: torch.Tensor, settings: TrainSettings,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimiser step on an augmented batch `(B, C, H, W)`; returns (logits (B, K), loss)."""
    logits, _, _, _ = model(augment(images, generator, settings.flip, settings.crop_padding))
    loss = F.cross_entropy(logits, labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return logits, loss


def train_one_epoch(
    model: SNGPClassifier,
    images: torch.Tensor,
    labels: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    settings: TrainSettings,
    generator: torch.Generator,
    deadline: float,
    description: str,
) -> tuple[float, float, bool]:
    """One epoch; resets the GP precision first. Returns (mean loss, accuracy, completed before the deadline)."""
    model.train()
    model.gp.reset_precision()
    order = torch.randperm(images.shape[0], generator=generator)
    total_loss, total_correct, seen = 0.0, 0, 0
    bar = tqdm(range(0, images.shape[0], settings.batch_size), desc=description, leave=False)
    for start in bar:
        if time.monotonic() > deadline:
            bar.close()
            return total_loss / max(seen, 1), total_correct / max(seen, 1), False
        index = order[start : start + settings.batch_size]
        logits, loss = training_step(model, optimizer, images[index], labels[index], settings, generator)
        if scheduler is not None:
            scheduler.step()
        total_loss += float(loss.detach()) * index.numel()
        total_correct += int((logits.argmax(1) == labels[index]).sum())
        seen += index.numel()
        bar.set_postfix(loss=f"{total_loss / seen:.4f}", acc=f"{total_correct / seen:.4f}")
    return total_loss / max(seen, 1), total_correct / max(seen, 1), True


def standardize(images: np.ndarray, config: SNGPConfig) -> torch.Tensor:
    """uint8 `(N, H, W)` or `(N, C, H, W)` -> float32 `(N, C, H, W)` standardised as inside the exported graph."""
    tensor = torch.from_numpy(images.astype(np.float32))
    tensor = tensor[:, None] if tensor.dim() == 3 else tensor
    return (tensor / 255.0 - config.pixel_mean) / config.pixel_std


@dataclass(frozen=True)
class SNGPData:
    """In-memory training data: uint8 images (N, C, H, W) and int64 labels for training, validation, test."""

    train_images: np.ndarray
    train_labels: np.ndarray
    validation_images: np.ndarray
    validation_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray


def save_checkpoint(path: Path, model: SNGPClassifier, settings: TrainSettings, extra: dict) -> None:
    torch.save(
        {"config": model.config.to_dict(), "settings": asdict(settings), "state_dict": model.state_dict(), **extra},
        path,
    )


def load_checkpoint(path: str | Path) -> tuple[SNGPClassifier, dict]:
    """Rebuild the classifier from a checkpoint written by `train` (weights, sigmas, covariance)."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    model = SNGPClassifier(SNGPConfig.from_dict(checkpoint["config"]))
    model.load_state_dict(checkpoint["state_dict"])
    model.eval()
    return model, checkpoint


def epochs_for_budget(
    model: SNGPClassifier, images: torch.Tensor, labels: torch.Tensor, settings: TrainSettings, seconds: float,
    validation_count: int, final_forwards: int,
) -> tuple[int, float]:
    """How many epochs of `images` (N, C, H, W) fit in `seconds`, from timing `PROBE_STEPS` optimiser steps on a copy
    of `model` (the copy is discarded, so the real schedule starts untouched). Each epoch also predicts
    `validation_count` images; `final_forwards` forward passes (precision pass, test predictions) come once at
    the end. Returns (epochs, estimated seconds per epoch); at least 1, at most `settings.max_epochs`."""
    import copy

    probe = copy.deepcopy(model)
    probe.train()
    optimizer = torch.optim.AdamW(probe.parameters(), lr=settings.learning_rate * 0.1)
    generator = torch.Generator().manual_seed(settings.seed + 1)
    batch_size = min(settings.batch_size, images.shape[0])
    timings = []
    for step in range(PROBE_STEPS + 2):
        index = torch.randint(0, images.shape[0], (batch_size,), generator=generator)
        began = time.monotonic()
        training_step(probe, optimizer, images[index], labels[index], settings, generator)
        if step >= 2:  # the first steps pay one-off allocation costs
            timings.append(time.monotonic() - began)
    probe.eval()
    began = time.monotonic()
    with torch.no_grad():
        probe(images[: min(batch_size * 4, images.shape[0])])
    forward_per_image = (time.monotonic() - began) / min(batch_size * 4, images.shape[0])
    per_epoch = float(np.median(timings)) * math.ceil(images.shape[0] / batch_size) * EPOCH_OVERHEAD + forward_per_image * validation_count
    return int(np.clip((seconds - forward_per_image * final_forwards) // per_epoch, 1, settings.max_epochs)), per_epoch


PROBE_STEPS = 8
EPOCH_OVERHEAD = 1.08
"""Bookkeeping beyond the timed steps (shuffling, the precision update, progress bars), measured on CPU."""


def train(settings: TrainSettings, data: SNGPData | None = None) -> dict:
    """Train, write `checkpoint.pt` every epoch, `model.pt` + `metrics.json` at the end; return the metrics.

    Data: `data` when given (its image shape sets the network's input), else `settings.data_dir`."""
    started = time.monotonic()
    deadline = started + settings.max_minutes * 60.0
    torch.set_num_threads(settings.threads)
    torch.manual_seed(settings.seed)
    generator = torch.Generator().manual_seed(settings.seed)
    out_dir = Path(settings.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if data is None:
        train_file = load_images(settings.data_dir, "train")
        test_file = load_images(settings.data_dir, "test")
        if train_file.labels is None or test_file.labels is None:
            raise ValueError(f"{settings.data_dir}: SNGP trains on labelled images; the IDX label files are missing")
        split = bundle_split(len(train_file.images))
        data = SNGPData(train_file.images[split.train], train_file.labels[split.train], train_file.images[split.validation],
                        train_file.labels[split.validation], test_file.images, test_file.labels)
    shape = data.train_images.shape
    sample = data.train_images[:: max(1, len(data.train_images) // 5000)].astype(np.float64) / 255.0
    from_data = {"in_channels": 1 if len(shape) == 3 else shape[1], "image_size": shape[-2], "image_width": shape[-1],
                 "pixel_mean": float(sample.mean()), "pixel_std": float(sample.std() + 1e-6)}
    config = SNGPConfig.from_dict({**SNGPConfig().to_dict(), **from_data, **settings.model})
    settings.model = config.to_dict()

    limit = settings.limit_train or len(data.train_images)
    train_images = standardize(data.train_images[:limit], config)
    train_labels = torch.from_numpy(np.asarray(data.train_labels[:limit], dtype=np.int64))
    validation_images = standardize(data.validation_images, config)
    validation_labels = data.validation_labels

    model = SNGPClassifier(config)
    parameters = sum(p.numel() for p in model.parameters())
    if settings.epochs <= 0:
        # leave room for what follows the last epoch: the eval-mode precision pass over the training images and
        # the validation and test predictions
        affordable = settings.max_minutes * 60.0 - (time.monotonic() - started)
        final_forwards = train_images.shape[0] + 2 * len(validation_images) + len(data.test_images)
        settings.epochs, per_epoch = epochs_for_budget(model, train_images, train_labels, settings, 0.92 * affordable,
                                                       len(validation_images), final_forwards)
        tqdm.write(f"time budget {affordable / 60:.1f} min: {settings.epochs} epochs of about {per_epoch:.0f} s")
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.learning_rate, weight_decay=settings.weight_decay)
    steps_per_epoch = math.ceil(train_images.shape[0] / settings.batch_size)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=settings.learning_rate, total_steps=settings.epochs * steps_per_epoch, pct_start=0.2
    )
    history = []
    epoch_seconds: list[float] = []
    precision_complete = False
    for epoch in tqdm(range(settings.epochs), desc="epochs"):
        epoch_start = time.monotonic()
        if epoch_seconds and epoch_start + max(epoch_seconds) > deadline:
            tqdm.write(f"time budget: stopping before epoch {epoch + 1} (last full epoch holds the precision)")
            break
        loss, accuracy, precision_complete = train_one_epoch(
            model, train_images, train_labels, optimizer, scheduler, settings, generator, deadline,
            f"epoch {epoch + 1}/{settings.epochs}",
        )
        epoch_seconds.append(time.monotonic() - epoch_start)
        validation_accuracy = float(
            (predict(model, validation_images)["mean_field"].argmax(1) == validation_labels).mean()
        )
        history.append({"epoch": epoch + 1, "loss": loss, "train_accuracy": accuracy,
                        "validation_accuracy": validation_accuracy, "seconds": epoch_seconds[-1],
                        "complete": precision_complete})
        tqdm.write(json.dumps(history[-1]))
        save_checkpoint(out_dir / "checkpoint.pt", model, settings, {"epoch": epoch + 1, "history": history})
        if not precision_complete:
            break
    refresh_all_sigmas(model)
    # The per-epoch sum used train-mode features (batch statistics, weights changing within the epoch); the
    # served graph computes eval-mode features with the final sigmas, so the precision is summed again on those.
    tqdm.write("precision: eval-mode pass over split.train with the final spectral norms"
               + ("" if precision_complete else " (the last epoch was cut short)"))
    precision_pass(model, train_images, settings.batch_size)
    model.gp.update_covariance()
    train_minutes = (time.monotonic() - started) / 60.0

    test_images = standardize(data.test_images, config)
    test_outputs = predict(model, test_images)
    validation_outputs = predict(model, validation_images)
    test_probabilities = _softmax(test_outputs["mean_field"])
    metrics = {
        "test_accuracy": float((test_probabilities.argmax(1) == data.test_labels).mean()),
        "test_ece": expected_calibration_error(test_probabilities, data.test_labels, bins=15),
        "test_accuracy_plain_logits": float((test_outputs["logits"].argmax(1) == data.test_labels).mean()),
        "validation_accuracy": float((validation_outputs["mean_field"].argmax(1) == validation_labels).mean()),
        "train_minutes": train_minutes,
        "epochs_completed": len(history),
        "parameters": parameters,
        "history": history,
    }
    save_checkpoint(out_dir / "model.pt", model, settings, {"epoch": len(history), "history": history, "final": True})
    save_checkpoint(out_dir / "checkpoint.pt", model, settings, {"epoch": len(history), "history": history, "final": True})
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    print(json.dumps({k: v for k, v in metrics.items() if k != "history"}, indent=2))
    return metrics
