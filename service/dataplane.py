"""The transport-neutral data plane: what every scoring request goes through, whatever carried it.

v1 JSON/binary, v2 REST, v2 gRPC and the lean HTTP route are codecs: they turn their wire format into a
`ScoringInput` (images `(N, *input_shape)` float32 in raw scale and an optional alpha) and a `ScoredBatch` back
into their wire format. Everything between lives here, once:

- the key check (`authorize`): one constant-time comparison for every scope (scoring, admin, metrics);
- the model lookup (`model`), with the version a v2 path or `?version=` names;
- parameter validation (`checked_alpha`, the bundle's smallest alpha, the stream name);
- the score sequence (`score`): arrival in the batcher, decode, alpha check, merged scoring, metrics and the
  stream's drift tests, in that order.

The data plane raises domain exceptions only (`Unauthenticated`, `PermissionDenied`, `InvalidStreamError`, and
the engine's, batcher's and inputs' own); the edge maps them to HTTP statuses or gRPC codes in one table
(`oodserve.server.errors.DOMAIN_ERRORS`). It imports nothing from the edge (import-linter checks it).
"""

from __future__ import annotations

import hashlib
import hmac
import math
import re
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal, Protocol, TypeVar

import numpy as np
from pydantic import SecretStr

from oodserve.config import Settings
from oodserve.drift.monitor import DEFAULT_STREAM
from oodserve.drift.store import DriftStore
from oodserve.engine import Engine, EngineRegistry
from oodserve.observability.metrics import ServiceMetrics
from oodserve.runtime.batching import BatchScheduler
from oodserve.scoring.pipeline import BatchScores

KeyScope = Literal["api", "admin", "metrics"]
SCOPE_LABELS: dict[KeyScope, str] = {"api": "API", "admin": "admin", "metrics": "API or admin"}
STREAM_PATTERN = re.compile(r"[A-Za-z0-9_.:-]{1,64}")


class Unauthenticated(Exception):
    """No key was presented where one is needed (HTTP 401 with a Bearer challenge, gRPC UNAUTHENTICATED)."""


class PermissionDenied(Exception):
    """The presented key is not valid for the scope, or the scope is disabled (HTTP 403, gRPC PERMISSION_DENIED)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class InvalidStreamError(Exception):
    """A malformed stream name (`X-OOD-Stream` header or `x-ood-stream` metadata): HTTP 422."""


class PlaneState(Protocol):
    """What the data plane reads of the serving process (the edge's `AppState` satisfies it)."""

    settings: Settings
    metrics: ServiceMetrics
    batching: BatchScheduler
    drift: DriftStore | None

    def ready_registry(self) -> EngineRegistry: ...


class ScoringInput(Protocol):
    """A decoded request: images `(N, *input_shape)` float32 (validated against the bundle's input spec) and alpha."""

    @property
    def images(self) -> np.ndarray: ...

    @property
    def alpha(self) -> float | None: ...


@dataclass(frozen=True)
class DecodedInput:
    """The plain `ScoringInput` of codecs that have nothing else to carry."""

    images: np.ndarray
    alpha: float | None


Decoded = TypeVar("Decoded", bound=ScoringInput)


def checked_alpha(value: Any) -> float | None:
    """`value` as a float when it is a number (not a boolean) in (0, 1), else None: the one alpha check."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not 0.0 < value < 1.0:
        return None
    return float(value)


def check_stream_name(value: str | None) -> str:
    """A stream name as sent, `default` when none; InvalidStreamError when it is not 1-64 of [A-Za-z0-9_.:-]."""
    if value is None:
        return DEFAULT_STREAM
    if not STREAM_PATTERN.fullmatch(value):
        raise InvalidStreamError(f"header X-OOD-Stream must be 1 to 64 characters of A-Z a-z 0-9 _ . : -, got {value[:80]!r}")
    return value


def _digest(text: str) -> bytes:
    """sha256 of the key, so compare_digest always sees equal lengths (the key length does not leak either)."""
    return hashlib.sha256(text.encode("utf-8")).digest()


def key_matches(presented: str, configured: Iterable[SecretStr]) -> bool:
    """True when `presented` equals one of the configured keys; every key is compared (no early exit),
    each with hmac.compare_digest, so the time taken does not depend on where the keys differ."""
    presented_digest = _digest(presented)
    matched = False
    for key in configured:
        matched |= hmac.compare_digest(presented_digest, _digest(key.get_secret_value()))
    return matched


class DataPlane:
    """Key check, model lookup, validation and the score sequence over one serving process's state."""

    def __init__(self, state: PlaneState) -> None:
        self.state = state

    # ---- the key check ----

    def keys_for(self, scope: KeyScope) -> list[SecretStr] | None:
        """The keys a scope accepts; None when the scope is open (no scoring keys; metrics not protected)."""
        settings = self.state.settings
        if scope == "api":
            return settings.api_keys or None
        if scope == "admin":
            return settings.admin_keys
        return [*settings.api_keys, *settings.admin_keys] if settings.protect_metrics else None

    def authorize(self, presented: str | None, scope: KeyScope = "api", asked_by: str = "endpoint",
                  how: str = "send `Authorization: Bearer KEY`") -> None:
        """Pass when `scope` is open or `presented` is one of its keys.

        Unauthenticated without a key; PermissionDenied (`forbidden`) with a wrong one, or (`admin_disabled`) for
        the admin scope when no admin key is configured: admin endpoints are never open.
        """
        keys = self.keys_for(scope)
        if keys is None:
            return
        if scope == "admin" and not keys:
            raise PermissionDenied("admin_disabled", "admin endpoints are disabled: no OODSERVE_ADMIN_KEYS are configured")
        label = SCOPE_LABELS[scope]
        if not presented:
            raise Unauthenticated(f"this {asked_by} needs an {label} key: {how}")
        if not key_matches(presented, keys):
            raise PermissionDenied("forbidden", f"the presented key is not a valid {label} key")

    # ---- the model lookup ----

    def registry(self) -> EngineRegistry:
        """The served engines; NotReadyError until bundles are loaded and warmed up."""
        return self.state.ready_registry()

    def model(self, name: str | None, version: str | None = None) -> Engine:
        """The default model (name None), or the named one (UnknownModelError, 404, listing the served names),
        whose version must equal `version` when one is given."""
        registry = self.state.ready_registry()
        return registry.default if name is None else registry.require(name, version)

    # ---- the score sequence ----

    async def score(self, engine: Engine, stream: str | None, decode: Callable[[], Awaitable[Decoded]]) -> tuple[Decoded, BatchScores]:
        """Score one request: queue its arrival (so the batcher sees it while its body is still being read and
        decoded), decode it, check its alpha against the bundle, score it in a merged run, then record the batch's
        metrics and feed its fused statistics into the stream's drift tests."""
        stream_name = check_stream_name(stream)
        state = self.state
        with state.batching.arrival(engine) as arrival:
            decoded = await decode()
            engine.check_alpha(decoded.alpha)
            started = time.perf_counter()
            scores = await state.batching.score(engine, decoded.images, decoded.alpha, arrival)
        state.metrics.observe_batch(engine.name, scores, time.perf_counter() - started)
        self.observe_stream(stream_name, engine, scores)
        return decoded, scores

    def observe_stream(self, stream: str, engine: Engine, scores: BatchScores) -> None:
        """Feed a scored batch's fused statistics into its stream's tests (no-op when drift is off)."""
        if self.state.drift is not None:
            self.state.drift.observe(engine.name, stream, engine.bundle.calibration.fused, scores.fused_score)
