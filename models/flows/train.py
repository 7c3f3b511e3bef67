"""Maximum-likelihood training of an image flow on 8-bit data, with checkpoints, resume and early stop.

Objective: mean bits/dim of uniformly dequantised training images (Theis et al. 2016), minimised
with Adam, linear warm-up then cosine decay, gradient clipping and a Polyak/EMA average of the
weights (used for validation, `best.pt` and the test number). Trains only on `bundle_split().train`,
early-stops on `.validation`, never touches `.calibration`; the test number is on the t10k file at
the deterministic centre of each bin (see `preprocessing.py`).
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from oodserve.models import perturbations
from oodserve.models.data import DEFAULT_FASHION_MNIST_DIR, load_images
from oodserve.models.flows.base import Flow, InjectiveFlow, evaluation_mode
from oodserve.models.flows.hybrid import hybrid_loss
from oodserve.models.flows.jko import jko_stages, stage_objective, transport_cost
from oodserve.models.flows.preprocessing import bits_per_dim, centre_of_bin, dequantize_uniform
from oodserve.models.flows.zoo import build_flow, preset_config
from oodserve.models.splits import bundle_split


@dataclass
class TrainSettings:
    """Everything the `oodserve train flow` command controls."""

    family: str = "glow"
    data: str = str(DEFAULT_FASHION_MNIST_DIR)
    out: str = "runs/flow"
    epochs: int = 20
    batch_size: int = 64
    lr: float = 1e-3
    warmup_steps: int = 200
    seed: int = 0
    max_minutes: float | None = None
    threads: int | None = None
    resume: bool = False
    mutation_rate: float = 0.0
    weight_decay: float = 0.0
    preset: str = "default"
    overrides: dict[str, Any] = field(default_factory=dict)
    patience: int = 3
    ema_decay: float = 0.999
    gradient_clip: float = 50.0
    eval_minutes: float = 10.0
    limit_train: int | None = None
    limit_test: int | None = None
    eval_batch_size: int = 500
    hybrid: bool = False
    """Add a linear classifier head on the latent and train on CE + nll_weight * bits/dim (`oodserve.models.flows.hybrid`);
    needs labels."""
    nll_weight: float = 1.0
    schedule: str = "joint"
    """"joint": every parameter trained end to end; "jko": a sequence of JKO proximal steps, one stage of the flow at a
    time (`oodserve.models.flows.jko`), the budget (epochs or minutes) split evenly between the stages."""
    jko_step_size: float = 1.0
    jko_steps: int | None = None
    snapshot_minutes: tuple[float, ...] = ()
    """Also save the EMA model as `snapshot-{m}min.pt` when the training clock passes each of these minutes."""


def mutate_pixels(pixels: Tensor, rate: float, generator: torch.Generator) -> Tensor:
    """The background model's training inputs (Ren et al. 2019): `oodserve.models.perturbations.mutate_pixels` on a
    uint8 tensor `(N, ...)`, seeded from `generator` so a resumed run stays reproducible. Same shape and dtype."""
    if rate <= 0:
        return pixels
    rng = np.random.default_rng(int(torch.randint(0, 2**63 - 1, (1,), generator=generator).item()))
    return torch.from_numpy(perturbations.mutate_pixels(pixels.numpy(), rng, rate))


@torch.no_grad()
def _mean_bits_per_dim(
    flow: Flow, pixels: Tensor, to_unit: Callable[[Tensor], Tensor], batch_size: int, progress: str | None
) -> float:
    """Mean bits/dim of 8-bit images `(N, 1, H, W)` evaluated at `to_unit(batch)` in [0, 1], model in eval mode."""
    total, count = 0.0, 0
    batches = range(0, pixels.shape[0], batch_size)
    with evaluation_mode(flow):
        for start in tqdm(batches, desc=progress, leave=False, disable=progress is None):
            batch = pixels[start : start + batch_size]
            total += float(bits_per_dim(flow.log_prob(to_unit(batch)), flow.dimension).sum())
            count += batch.shape[0]
    return total / count


@torch.no_grad()
def evaluate_objective(flow: Flow, pixels: Tensor, batch_size: int = 500) -> float:
    """Mean `flow.training_loss` (a model with its own objective, e.g. a rectangular flow) over 8-bit images
    `(N, C, H, W)` at the bin centres, in eval mode."""
    if not isinstance(flow, InjectiveFlow):
        raise TypeError(f"a {type(flow).__name__} has no objective of its own (training_loss): evaluate its bits/dim")
    total = 0.0
    with evaluation_mode(flow):
        for start in range(0, pixels.shape[0], batch_size):
            batch = pixels[start : start + batch_size]
            total += float(flow.training_loss(centre_of_bin(batch))) * batch.shape[0]
    return total / pixels.shape[0]


def evaluate_bits_per_dim(flow: Flow, pixels: Tensor, batch_size: int = 500, progress: str | None = None) -> float:
    """Mean bits/dim of 8-bit images `(N, 1, H, W)` at the centre of each bin, model in eval mode."""
    return _mean_bits_per_dim(flow, pixels, centre_of_bin, batch_size, progress)


def evaluate_dequantized_bits_per_dim(
    flow: Flow, pixels: Tensor, batch_size: int = 500, seed: int = 0, progress: str | None = None
) -> float:
    """Mean bits/dim of 8-bit images `(N, 1, H, W)` under uniform dequantisation, one noise draw per image.

    `-E_v[log p((x + v) / 256)] + D log 256` (in bits per dimension) is the upper bound on the discrete
    negative log-likelihood that flow papers report (Theis et al. 2016; RealNVP and Glow tables); the
    mean over N images with one draw each estimates it without bias. The bin-centre value of
    `evaluate_bits_per_dim` is what the service computes and is not comparable with those tables.
    """
    generator = torch.Generator().manual_seed(seed)
    return _mean_bits_per_dim(flow, pixels, lambda batch: dequantize_uniform(batch, generator), batch_size, progress)


def _learning_rate(settings: TrainSettings, step: int, progress: float) -> float:
    warmup = min(1.0, (step + 1) / max(1, settings.warmup_steps))
    cosine = 0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return settings.lr * warmup * cosine


def _update_ema(ema: Flow, model: Flow, decay: float) -> None:
    with torch.no_grad():
        for ema_parameter, parameter in zip(ema.parameters(), model.parameters()):
            ema_parameter.lerp_(parameter, 1.0 - decay)
        for ema_buffer, buffer in zip(ema.buffers(), model.buffers()):
            ema_buffer.copy_(buffer)


def load_checkpoint_flow(path: str | Path) -> tuple[Flow, dict[str, Any]]:
    """Rebuild the flow stored in `checkpoint.pt` / `best.pt` (EMA weights); returns (flow in eval mode, checkpoint)."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    flow = build_flow(checkpoint["family"], checkpoint["config"])
    flow.load_state_dict(checkpoint["ema_state"])
    flow.eval()
    return flow, checkpoint


def _as_image_tensor(images: np.ndarray) -> Tensor:
    """uint8 images (N, H, W) or (N, C, H, W) -> a (N, C, H, W) uint8 tensor."""
    pixels = torch.from_numpy(np.ascontiguousarray(images))
    return pixels.unsqueeze(1) if pixels.dim() == 3 else pixels


@dataclass(frozen=True)
class FlowData:
    """In-memory training data: uint8 images (N, C, H, W) for training, validation and the final test, with
    integer labels `(N,)` for a hybrid flow."""

    train: np.ndarray
    validation: np.ndarray
    test: np.ndarray
    train_labels: np.ndarray | None = None
    validation_labels: np.ndarray | None = None
    test_labels: np.ndarray | None = None


@torch.no_grad()
def evaluate_hybrid(flow: Flow, pixels: Tensor, labels: Tensor, batch_size: int = 500, progress: str | None = None) -> dict[str, float]:
    """A hybrid flow in eval mode on 8-bit images `(N, C, H, W)` at the bin centres with labels `(N,)`:
    mean bits/dim, mean cross-entropy (nats) and accuracy."""
    import torch.nn.functional as F

    assert flow.classifier is not None
    bits, cross_entropy, correct = 0.0, 0.0, 0
    with evaluation_mode(flow):
        for start in tqdm(range(0, pixels.shape[0], batch_size), desc=progress, leave=False, disable=progress is None):
            latent, log_prob, _ = flow.latent_log_prob_with_levels(centre_of_bin(pixels[start : start + batch_size]))
            logits = flow.classifier(latent)
            batch_labels = labels[start : start + batch_size]
            bits += float(bits_per_dim(log_prob, flow.dimension).sum())
            cross_entropy += float(F.cross_entropy(logits, batch_labels, reduction="sum"))
            correct += int((logits.argmax(dim=1) == batch_labels).sum())
    count = pixels.shape[0]
    return {"bpd": bits / count, "cross_entropy": cross_entropy / count, "accuracy": correct / count}


def class_count(labels: np.ndarray) -> int:
    """Number of classes of integer labels 0..K-1 (a hybrid head needs them contiguous from 0)."""
    if labels.size == 0 or labels.min() < 0:
        raise ValueError("labels must be non-negative integers 0..K-1")
    return int(labels.max()) + 1


def train_flow(settings: TrainSettings, data: FlowData | None = None) -> dict[str, Any]:
    """Train, checkpoint, early-stop and evaluate; writes `checkpoint.pt`, `best.pt`, `metrics.json` in `out`.

    Data: `data` when given (its image shape becomes the flow's input shape), else `settings.data` read with
    `oodserve.models.data.load_images` and split by `bundle_split`."""
    if settings.schedule not in ("joint", "jko"):
        raise ValueError(f"schedule must be joint or jko, got {settings.schedule!r}")
    if settings.threads:
        torch.set_num_threads(settings.threads)
    out = Path(settings.out)
    out.mkdir(parents=True, exist_ok=True)
    if data is None:
        training_file = load_images(settings.data, "train")
        split = bundle_split(training_file.images.shape[0])
        test_file = load_images(settings.data, "test")
        labels = training_file.labels
        data = FlowData(training_file.images[split.train], training_file.images[split.validation], test_file.images,
                        None if labels is None else labels[split.train], None if labels is None else labels[split.validation],
                        test_file.labels)
    train_pixels = _as_image_tensor(data.train[: settings.limit_train])
    validation_pixels = _as_image_tensor(data.validation[: settings.limit_train])
    train_labels = validation_labels = None
    hybrid_classes = 0
    if settings.hybrid:
        if data.train_labels is None or data.validation_labels is None:
            raise ValueError(f"{settings.data}: a hybrid flow needs labels and this data has none")
        hybrid_classes = class_count(data.train_labels)
        train_labels = torch.from_numpy(np.asarray(data.train_labels[: settings.limit_train], dtype=np.int64))
        validation_labels = torch.from_numpy(np.asarray(data.validation_labels[: settings.limit_train], dtype=np.int64))

    torch.manual_seed(settings.seed)
    config = {**preset_config(settings.family, settings.preset), "input_shape": tuple(train_pixels.shape[1:]), **settings.overrides}
    if hybrid_classes:
        config["classes"] = hybrid_classes
    model = build_flow(settings.family, config)
    optimizer = torch.optim.Adam(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    generator = torch.Generator().manual_seed(settings.seed)
    state: dict[str, Any] = {"epoch": 0, "batch_index": 0, "step": 0, "elapsed_s": 0.0, "best_validation_bpd": math.inf,
             "epochs_without_improvement": 0, "history": []}
    checkpoint_path, best_path = out / "checkpoint.pt", out / "best.pt"
    if settings.resume and checkpoint_path.exists():
        checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=False)
        config = checkpoint["config"]
        model = build_flow(settings.family, config)
        model.load_state_dict(checkpoint["model_state"])
        optimizer = torch.optim.Adam(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
        optimizer.load_state_dict(checkpoint["optimizer_state"])
        ema = build_flow(settings.family, config)
        ema.load_state_dict(checkpoint["ema_state"])
        state = checkpoint["state"]
        generator.set_state(checkpoint["generator_state"])
        print(f"resumed from {checkpoint_path} at epoch {state['epoch']} step {state['step']}")
    else:
        model.train()
        with torch.no_grad():  # data-dependent actnorm initialisation (Glow sec. 3.1)
            init_batch = train_pixels[torch.randperm(train_pixels.shape[0], generator=generator)[:512]]
            model.log_prob(dequantize_uniform(mutate_pixels(init_batch, settings.mutation_rate, generator), generator))
        ema = copy.deepcopy(model)
    ema.eval()
    parameters = sum(p.numel() for p in model.parameters())
    print(f"{settings.family} ({settings.preset}): {parameters:,} parameters, config {config}; "
          f"{train_pixels.shape[0]} training images, {validation_pixels.shape[0]} validation images")

    steps_per_epoch = math.ceil(train_pixels.shape[0] / settings.batch_size)
    total_steps = steps_per_epoch * settings.epochs
    budget_s = settings.max_minutes * 60.0 if settings.max_minutes else math.inf
    session_start = time.monotonic() - state["elapsed_s"]
    last_eval = time.monotonic()

    def elapsed() -> float:
        return time.monotonic() - session_start

    def save(kind: str) -> None:
        state["elapsed_s"] = elapsed()
        checkpoint = {"family": settings.family, "config": config, "settings": asdict(settings),
                      "model_state": model.state_dict(), "ema_state": ema.state_dict(),
                      "optimizer_state": optimizer.state_dict(), "generator_state": generator.get_state(),
                      "state": state, "parameters": parameters}
        torch.save(checkpoint, out / f"{kind}.tmp")
        (out / f"{kind}.tmp").replace(out / f"{kind}.pt")

    def validate(reason: str) -> bool:
        """Evaluate the EMA model; save best.pt on improvement (of bits/dim, or of CE + nll_weight * bits/dim for a
        hybrid); True when it improved."""
        record: dict[str, Any] = {"epoch": state["epoch"], "step": state["step"], "minutes": elapsed() / 60, "reason": reason}
        if validation_labels is not None:
            figures = evaluate_hybrid(ema, validation_pixels, validation_labels, settings.eval_batch_size)
            validation_bpd = figures["bpd"]
            objective = figures["cross_entropy"] + settings.nll_weight * validation_bpd
            record.update(validation_accuracy=figures["accuracy"], validation_cross_entropy=figures["cross_entropy"],
                          validation_objective=objective)
            shown = f"{validation_bpd:.4f} bits/dim, accuracy {figures['accuracy']:.4f}, objective {objective:.4f}"
        elif isinstance(ema, InjectiveFlow):
            objective = validation_bpd = evaluate_objective(ema, validation_pixels, settings.eval_batch_size)
            shown = f"objective {objective:.4f} per dimension"
        else:
            objective = validation_bpd = evaluate_bits_per_dim(ema, validation_pixels, settings.eval_batch_size)
            shown = f"{validation_bpd:.4f} bits/dim"
        record["validation_bpd"] = validation_bpd
        improved = objective < state.get("best_validation_objective", state["best_validation_bpd"])
        state["history"].append(record)
        if improved:
            state["best_validation_bpd"] = validation_bpd
            state["best_validation_objective"] = objective
            save("best")
        tqdm.write(f"[{reason}] epoch {state['epoch']} step {state['step']} {elapsed() / 60:.1f} min: "
                   f"validation {shown}{' (best)' if improved else ''}")
        return improved

    stages = jko_stages(model, settings.jko_steps) if settings.schedule == "jko" else []
    if stages:
        tqdm.write(f"JKO schedule: {len(stages)} steps of step size h = {settings.jko_step_size:g} over transforms "
                   f"{[(stage.start, stage.stop) for stage in stages]}")
    state.setdefault("jko_stage", -1)
    state.setdefault("jko_stage_start_step", 0)
    state.setdefault("snapshots", [])
    if not state["history"]:
        validate("initial")
    stop_reason = "epochs"
    while state["epoch"] < settings.epochs:
        order = torch.randperm(train_pixels.shape[0], generator=torch.Generator().manual_seed(settings.seed * 1000 + state["epoch"]))
        bar = tqdm(range(state["batch_index"], steps_per_epoch), desc=f"epoch {state['epoch'] + 1}/{settings.epochs}",
                   initial=state["batch_index"], total=steps_per_epoch, dynamic_ncols=True, mininterval=2.0)
        out_of_time = False
        for batch_index in bar:
            chosen = order[batch_index * settings.batch_size : (batch_index + 1) * settings.batch_size]
            inputs = dequantize_uniform(mutate_pixels(train_pixels[chosen], settings.mutation_rate, generator), generator)
            progress = max(state["step"] / max(1, total_steps), elapsed() / budget_s)
            schedule_step, schedule_progress = state["step"], progress
            if stages:  # one JKO step per equal share of the budget, each with its own warm-up and decay
                stage = min(len(stages) - 1, int(progress * len(stages)))
                if stage != state["jko_stage"]:
                    state["jko_stage"], state["jko_stage_start_step"] = stage, state["step"]
                    tqdm.write(f"JKO step {stage + 1}/{len(stages)}: transforms {stages[stage].start}..{stages[stage].stop - 1}")
                schedule_step, schedule_progress = state["step"] - state["jko_stage_start_step"], progress * len(stages) - stage
            for group in optimizer.param_groups:
                group["lr"] = _learning_rate(settings, schedule_step, schedule_progress)
            postfix: dict[str, str] = {}
            if stages:
                loss, kl, transport = stage_objective(model, stages[state["jko_stage"]], inputs, settings.jko_step_size)
                postfix = {"kl": f"{kl.item():.3f}", "w2": f"{transport.item():.4f}", "stage": str(state["jko_stage"] + 1)}
            elif train_labels is not None:
                assert model.classifier is not None
                latent, log_prob, _ = model.latent_log_prob_with_levels(inputs)
                loss, cross_entropy, bits = hybrid_loss(log_prob, model.classifier(latent), train_labels[chosen],
                                                        model.dimension, settings.nll_weight)
                postfix = {"ce": f"{cross_entropy.item():.3f}", "bpd": f"{bits.item():.3f}"}
            elif isinstance(model, InjectiveFlow):
                loss = model.training_loss(inputs)
            else:
                loss = bits_per_dim(model.log_prob(inputs), model.dimension).mean()
            optimizer.zero_grad(set_to_none=True)
            if torch.isfinite(loss):
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), settings.gradient_clip)
                optimizer.step()
                _update_ema(ema, model, min(settings.ema_decay, (1.0 + state["step"]) / (10.0 + state["step"])))
            state["step"] += 1
            state["batch_index"] = batch_index + 1
            bar.set_postfix(loss=f"{loss.item():.3f}", **postfix, lr=f"{optimizer.param_groups[0]['lr']:.1e}", refresh=False)
            for minutes in settings.snapshot_minutes:
                if minutes not in state["snapshots"] and elapsed() >= minutes * 60:
                    state["snapshots"].append(minutes)
                    save(f"snapshot-{minutes:g}min")
            if elapsed() >= budget_s:
                out_of_time = True
                break
            if time.monotonic() - last_eval >= settings.eval_minutes * 60:
                last_eval = time.monotonic()
                validate("periodic")
                save("checkpoint")
        bar.close()
        if out_of_time:
            stop_reason = "max-minutes"
            validate("time limit")
            save("checkpoint")
            break
        state["epoch"] += 1
        state["batch_index"] = 0
        last_eval = time.monotonic()
        improved = validate("epoch end")
        state["epochs_without_improvement"] = 0 if improved else state["epochs_without_improvement"] + 1
        save("checkpoint")
        if state["epochs_without_improvement"] >= settings.patience:
            stop_reason = "early stop"
            break

    train_minutes = elapsed() / 60
    best_flow, best_checkpoint = load_checkpoint_flow(best_path)
    test_pixels = _as_image_tensor(data.test[: settings.limit_test])
    extra: dict[str, Any] = {}
    if isinstance(best_flow, InjectiveFlow):  # an injective flow: its density lives on a manifold, bits/dim do not apply
        test_bpd = test_bpd_dequantized = None
        extra = {f"test_{key}": value for key, value in best_flow.evaluation_metrics(test_pixels, centre_of_bin).items()}
        extra["test_objective"] = evaluate_objective(best_flow, test_pixels, settings.eval_batch_size)
    else:
        if settings.hybrid and data.test_labels is not None:  # one pass gives bits/dim, cross-entropy and accuracy
            test_labels = torch.from_numpy(np.asarray(data.test_labels[: settings.limit_test], dtype=np.int64))
            figures = evaluate_hybrid(best_flow, test_pixels, test_labels, settings.eval_batch_size,
                                      progress="test (density and classifier)")
            test_bpd = figures["bpd"]
            extra = {"hybrid": True, "nll_weight": settings.nll_weight, "test_accuracy": figures["accuracy"],
                     "test_cross_entropy": figures["cross_entropy"]}
        else:
            test_bpd = evaluate_bits_per_dim(best_flow, test_pixels, settings.eval_batch_size, progress="test")
        test_bpd_dequantized = evaluate_dequantized_bits_per_dim(
            best_flow, test_pixels, settings.eval_batch_size, settings.seed, progress="test (dequantised)"
        )
    metrics = {"family": settings.family, "preset": settings.preset, "config": config, "parameters": parameters,
               "train_minutes": round(train_minutes, 2), "test_bpd": test_bpd, "test_bpd_dequantized": test_bpd_dequantized,
               "validation_bpd": state["best_validation_bpd"], "epochs_completed": state["epoch"],
               "steps": state["step"], "stop_reason": stop_reason, "mutation_rate": settings.mutation_rate,
               "weight_decay": settings.weight_decay, "test_images": int(test_pixels.shape[0]),
               "best_checkpoint_step": best_checkpoint["state"]["step"], "seed": settings.seed, **extra}
    try:
        metrics["test_transport_cost"] = transport_cost(best_flow, centre_of_bin(test_pixels[:2000]))
    except ValueError:  # not a flat chain of transforms
        pass
    if stages:
        metrics.update(schedule="jko", jko_steps=len(stages), jko_step_size=settings.jko_step_size)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    print(json.dumps(metrics, indent=2))
    return metrics
