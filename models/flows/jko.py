"""Training a flow as a sequence of JKO proximal steps (Jordan, Kinderlehrer and Otto 1998; JKO-iFlow, Xu, Cheng
and Xie 2023; the primal-dual view of Fan, Taghvaei and Chen, "Variational Wasserstein gradient flow").

The flow's trainable transforms are cut into `steps` contiguous stages `T_1, ..., T_K`. Stage k is trained
alone, on the data pushed through the frozen stages before it, `x ~ rho_{k-1}`, to minimise

    E[ V(T_k(x)) - log |det dT_k / dx| ] + 1 / (2 h) E || T_k(x) - x ||^2,    V(y) = ||y||^2 / 2,

the KL divergence of `T_k # rho_{k-1}` to the standard normal target (up to the constant entropy of rho_{k-1})
plus the squared Wasserstein transport cost of the step, `h` the step size. Every stage moves the data a
short way toward the normal, so the trained map is a discretised Wasserstein gradient flow: smaller, smoother
displacements than end-to-end maximum likelihood finds. The transport cost only counts shape-preserving
trainable transforms (a squeeze or flatten reorders coordinates and moves no mass); the fixed logit
preprocessing is left out of both the stages and the cost.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from oodserve.models.flows.base import (
    CompositeTransform,
    Flow,
    InjectiveFlow,
    ResidualTransform,
    Transform,
    evaluation_mode,
    sum_except_batch,
)

NORMALISATIONS = ("ActNorm", "ElementwiseAffine", "DiagonalRescaling")
"""Elementwise affine layers: not JKO steps of their own, they join the stage of the block after them."""


def _transforms(flow: Flow) -> Sequence[Transform]:
    if isinstance(flow, InjectiveFlow) or not isinstance(flow.transform, CompositeTransform):  # an injective flow has no chain
        raise ValueError("the JKO schedule needs a flow whose transform is a flat chain (CompositeTransform)")
    return flow.transform.members


def _trainable(transform: nn.Module) -> bool:
    return any(parameter.requires_grad for parameter in transform.parameters())


def jko_stages(flow: Flow, steps: int | None = None) -> list[range]:
    """Contiguous index ranges of `flow.transform.transforms`, one per JKO step. Transforms without parameters
    go with the trainable transform after them (those after the last one, with the last stage). `steps` (default:
    one per residual or coupling block, i.e. per trainable transform that is not one of `NORMALISATIONS`) groups the trainable
    transforms as evenly as possible."""
    transforms = _transforms(flow)
    trainable = [index for index, transform in enumerate(transforms) if _trainable(transform)]
    if not trainable:
        raise ValueError("the flow has no trainable transforms")
    blocks = [index for index in trainable if type(transforms[index]).__name__ not in NORMALISATIONS] or trainable
    steps = len(blocks) if steps is None else steps
    if not 1 <= steps <= len(blocks):
        raise ValueError(f"jko steps must be between 1 and the flow's {len(blocks)} blocks, got {steps}")
    # stage boundaries: stage s ends after block number ceil((s + 1) * len(blocks) / steps) - 1
    ends = [blocks[min(len(blocks) - 1, -(-(stage + 1) * len(blocks) // steps) - 1)] for stage in range(steps)]
    stages, start = [], 0
    for stage, end in enumerate(ends):
        stop = len(transforms) if stage == steps - 1 else end + 1
        stages.append(range(start, stop))
        start = stop
    return stages


def stage_parameters(flow: Flow, stage: range) -> list[nn.Parameter]:
    """The parameters stage `stage` trains."""
    transforms = _transforms(flow)
    return [parameter for index in stage for parameter in transforms[index].parameters()]


def _output_only(transform: nn.Module, inputs: Tensor) -> Tensor:
    """`transform(inputs)` without its log-det where that can be skipped (a residual block's `x + g(x)`)."""
    if isinstance(transform, ResidualTransform):
        return inputs + transform.residual(inputs, transform.weights())[0]
    return transform(inputs)[0]


@torch.no_grad()
def push_forward(flow: Flow, inputs: Tensor, stop: int) -> Tensor:
    """Inputs `(N, *event_shape)` through transforms `[0, stop)` of the flow, frozen (eval mode), outputs only."""
    outputs = inputs
    for transform in _transforms(flow)[:stop]:
        with evaluation_mode(transform):
            outputs = _output_only(transform, outputs)
    return outputs


def _moves_mass(transform: nn.Module, inputs: Tensor, outputs: Tensor) -> bool:
    return _trainable(transform) and inputs.shape == outputs.shape


def stage_objective(flow: Flow, stage: range, inputs: Tensor, step_size: float) -> tuple[Tensor, Tensor, Tensor]:
    """(loss, KL part, transport cost), scalars averaged over the batch and divided by the dimension D, of JKO step
    `stage` for data `inputs` `(N, *event_shape)` in [0, 1]; the earlier stages are applied frozen."""
    transforms = _transforms(flow)
    current = push_forward(flow, inputs, stage.start)
    log_det = torch.zeros(inputs.shape[0], dtype=inputs.dtype, device=inputs.device)
    transport = torch.zeros_like(log_det)
    for index in stage:
        transform = transforms[index]
        outputs, step_log_det = transform(current)
        log_det = log_det + step_log_det
        if _moves_mass(transform, current, outputs):
            transport = transport + sum_except_batch((outputs - current) ** 2)
        current = outputs
    kl = 0.5 * sum_except_batch(current**2) - log_det
    dimension = flow.dimension
    return ((kl + transport / (2.0 * step_size)) / dimension).mean(), (kl / dimension).mean(), (transport / dimension).mean()


@torch.no_grad()
def transport_cost(flow: Flow, inputs: Tensor, batch_size: int = 500) -> float:
    """Mean over inputs `(N, *event_shape)` in [0, 1] of the summed squared displacement sum_k ||T_k(x) - x||^2 of
    every shape-preserving trainable transform (the map's total transport cost), flow in eval mode."""
    transforms = _transforms(flow)
    total = 0.0
    with evaluation_mode(flow):
        for start in range(0, inputs.shape[0], batch_size):
            current = inputs[start : start + batch_size]
            for transform in transforms:
                outputs = _output_only(transform, current)
                if _moves_mass(transform, current, outputs):
                    total += float(sum_except_batch((outputs - current) ** 2).sum())
                current = outputs
    return total / inputs.shape[0]
