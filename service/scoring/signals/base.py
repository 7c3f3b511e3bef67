"""The signal-kind contract and its registry: every kind has a pure `score` and a `fit` beside it.

A signal kind turns model outputs (and the raw inputs) into one OOD score per instance, oriented so
that higher means more out-of-distribution:

- ``score(outputs, images, source, params, *, arrays, prepared) -> (N,) float64``: finite, or NaN where a
  model could not score an instance (the conformal p-value treats NaN as maximally OOD); row ``i`` depends
  on row ``i`` of the inputs only, so the batcher may score merged batches and slice them. ``params`` are
  the manifest entry's JSON parameters, ``arrays`` the arrays of its parameters file (name -> ndarray,
  empty for kinds without one) and ``prepared`` the kind's ``prepare`` result (N,) when it was computed
  ahead (else None: the kind computes it);
- ``fit(outputs, images, source, options, labels) -> FittedSignal``: the kind's parameters learned from
  in-distribution reference data (a training split), given the options a bundle builder chose. Kinds
  with nothing to learn return the options unchanged.

A kind is registered once in `SIGNAL_KINDS` with `register_signal_kind`; a manifest that names an
unknown kind or leaves out a required parameter is refused when the bundle loads.

Conventions shared with the exported models (design.md section 3): a flow's `log_prob` is the
log-density in nats of u = (x + 0.5) / 256 on [0, 1]^D, D = prod(per-instance input shape).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Protocol

import numpy as np

from oodserve.bundle.signals import PARAMETERS_FILE_KEY, SignalSource  # noqa: F401  (re-exported with the kinds)

ModelOutputs = Mapping[str, Mapping[str, np.ndarray]]
"""outputs[model_name][output_name] -> array with a leading batch axis N."""

NO_ARRAYS: Mapping[str, np.ndarray] = MappingProxyType({})
"""The `arrays` of a signal without a parameters file."""


@dataclass(frozen=True)
class FittedSignal:
    """What `fit` learned: JSON `params` for the manifest and, when the kind has a parameters file,
    the `arrays` (name -> ndarray) that go into it."""

    params: dict[str, Any]
    arrays: dict[str, np.ndarray] = field(default_factory=dict)


class SignalScoreFunction(Protocol):
    """score(outputs, images (N, *input_shape) float raw scale, source, params, *, arrays, prepared (N,) or None)
    -> (N,) float64."""

    def __call__(
        self,
        outputs: ModelOutputs,
        images: np.ndarray,
        source: SignalSource,
        params: Mapping[str, Any],
        *,
        arrays: Mapping[str, np.ndarray] = NO_ARRAYS,
        prepared: np.ndarray | None = None,
    ) -> np.ndarray: ...


class SignalFitFunction(Protocol):
    """fit(reference outputs, reference images (N, *input_shape), source, options, labels (N,) or None)."""

    def __call__(
        self,
        outputs: ModelOutputs,
        images: np.ndarray,
        source: SignalSource,
        options: Mapping[str, Any],
        labels: np.ndarray | None,
    ) -> FittedSignal: ...


def keep_options(
    outputs: ModelOutputs, images: np.ndarray, source: SignalSource, options: Mapping[str, Any], labels: np.ndarray | None
) -> FittedSignal:
    """The `fit` of kinds with nothing to learn: the options are the parameters."""
    return FittedSignal(dict(options))


def no_extra_sources(params: Mapping[str, Any]) -> list[SignalSource]:
    return []


@dataclass(frozen=True)
class SignalKind:
    """A registered signal kind: its score and fit functions and what a manifest entry must provide.

    required_params: names that must appear in the signal's `params`.
    extra_sources: model outputs read besides the signal's own (for example a background model).
    validate: optional check of (params, per-instance input shape); raises ValueError with a message.
    check_environment: optional check, when the bundle loads, that this machine computes the signal as the
    machine that fitted it did, (params, arrays of the parameters file) -> what differs, or None.
    prepare: optional part of the score that needs the inputs only, (images, params) -> (N,); the batcher may
    run it beside the models, and `score` then gets its result as `prepared` (else computes it).
    """

    name: str
    score: SignalScoreFunction
    description: str
    fit: SignalFitFunction = keep_options
    required_params: tuple[str, ...] = ()
    extra_sources: Callable[[Mapping[str, Any]], list[SignalSource]] = no_extra_sources
    validate: Callable[[Mapping[str, Any], Sequence[int]], None] | None = None
    check_environment: Callable[[Mapping[str, Any], Mapping[str, np.ndarray]], str | None] | None = None
    prepare: Callable[[np.ndarray, Mapping[str, Any]], np.ndarray] | None = None


SIGNAL_KINDS: dict[str, SignalKind] = {}


def register_signal_kind(
    name: str,
    *,
    description: str,
    fit: SignalFitFunction = keep_options,
    required_params: tuple[str, ...] = (),
    extra_sources: Callable[[Mapping[str, Any]], list[SignalSource]] = no_extra_sources,
    validate: Callable[[Mapping[str, Any], Sequence[int]], None] | None = None,
    check_environment: Callable[[Mapping[str, Any], Mapping[str, np.ndarray]], str | None] | None = None,
    prepare: Callable[[np.ndarray, Mapping[str, Any]], np.ndarray] | None = None,
) -> Callable[[SignalScoreFunction], SignalScoreFunction]:
    """Decorator adding the decorated score function as a signal kind to `SIGNAL_KINDS` (refuses a duplicate name)."""

    def decorator(score: SignalScoreFunction) -> SignalScoreFunction:
        if name in SIGNAL_KINDS:
            raise ValueError(f"signal kind {name!r} is already registered")
        SIGNAL_KINDS[name] = SignalKind(
            name=name,
            score=score,
            description=description,
            fit=fit,
            required_params=required_params,
            extra_sources=extra_sources,
            validate=validate,
            check_environment=check_environment,
            prepare=prepare,
        )
        return score

    return decorator


def per_instance_values(array: np.ndarray, what: str) -> np.ndarray:
    """Flatten a model output of shape (N,) or (N, 1, ...) to (N,) float64; refuses (N, K>1)."""
    values = np.asarray(array, dtype=np.float64)
    if values.ndim == 0:
        raise ValueError(f"{what}: expected one value per instance, got a scalar")
    flat = values.reshape(values.shape[0], -1)
    if flat.shape[1] != 1:
        raise ValueError(f"{what}: expected one value per instance, got shape {list(values.shape)}")
    return flat[:, 0]


def read_output(outputs: ModelOutputs, source: SignalSource) -> np.ndarray:
    """The array outputs[source.model][source.output]."""
    return np.asarray(outputs[source.model][source.output])


def read_scalar_output(outputs: ModelOutputs, source: SignalSource) -> np.ndarray:
    """The source output as one float64 value per instance (N,)."""
    return per_instance_values(read_output(outputs, source), f"{source.model}.{source.output}")


def require_number(params: Mapping[str, Any], key: str, *, positive: bool = False) -> None:
    """ValueError unless params[key] is a finite number (and > 0 when `positive`)."""
    value = params.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"params.{key} must be a finite number, got {value!r}")
    if positive and value <= 0:
        raise ValueError(f"params.{key} must be > 0, got {value!r}")


def dimensions_of(images: np.ndarray) -> int:
    """D = number of values per instance of an (N, *input_shape) batch."""
    return int(np.prod(images.shape[1:]))


def bits_per_dim_from_log_prob(log_prob_nats: np.ndarray, dimensions: int) -> np.ndarray:
    """Discrete 8-bit bits/dim: bpd = -(log p(u) - D ln 256) / (D ln 2); log p(u) in nats on [0,1]^D."""
    log_prob = np.asarray(log_prob_nats, dtype=np.float64)
    return -(log_prob - dimensions * math.log(256.0)) / (dimensions * math.log(2.0))


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax of (N, C) logits, numerically stable, float64."""
    values = np.asarray(logits, dtype=np.float64)
    shifted = values - np.max(values, axis=1, keepdims=True)
    exponentials = np.exp(shifted)
    return exponentials / np.sum(exponentials, axis=1, keepdims=True)
