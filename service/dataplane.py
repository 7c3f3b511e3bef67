"""The transport-neutral data plane: what every scoring request goes through, whatever carried it.

v1 JSON/binary, v2 REST, v2 gRPC and the lean HTTP route are codecs: they turn their wire format into a
`ScoringInput` (images `(N, *input_shape)` float32 in raw scale and an optional alpha) and a `ScoredBatch` back
into their wire format. Everything between lives here, once:

- the key check (`authorize`): one constant-time comparison for every scope (scoring, admin, metrics);
- the model lookup (`model`), with the version a v2 path or `?version=` names;
- parameter validation (`checked_alpha`, the bundle's smallest alpha, the stream name);
- the score sequence (`score`): arrival in the batcher, decode, alpha check, merged scoring, metrics and the
  stream's drift tests, in that order;
- the typed answers: `ScoreResponse` (built by `score_response`) and `ModelDescription` (`describe_model`), the very
  models FastAPI documents, so the OpenAPI schema and what is sent cannot drift apart.

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
from pydantic import BaseModel, Field, SecretStr

from oodserve.config import Settings
from oodserve.drift.monitor import DEFAULT_STREAM
from oodserve.drift.store import DriftStore
from oodserve.engine import Engine, EngineRegistry
from oodserve.observability.metrics import ServiceMetrics
from oodserve.runtime.batching import BatchScheduler
from oodserve.scoring.batch_typicality import BatchTypicalityResult
from oodserve.scoring.inputs import accepted_instance_shapes
from oodserve.scoring.pipeline import BatchScores, InstanceResult
from oodserve.scoring.signals import SIGNAL_KINDS

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


# ---- the typed answers ----


class BatchTest(BaseModel):
    """Batch typicality test (Nalisnick et al. 2019b), present for M >= 2 instances when the bundle has one."""

    test: str = Field(description="Always 'typicality'.")
    size: int = Field(description="M, the number of instances in the batch.")
    statistic: float | None = Field(description="|mean bits/dim of the batch - training entropy| (null when not finite).")
    p_value: float = Field(description="Conformal p-value against K disjoint batches of M held-out in-distribution inputs.")
    minimum_alpha: float = Field(description="1 / (K + 1): the smallest p-value a batch of this size can get.")
    reference_batches: int = Field(description="K, the disjoint reference batches of M.")
    threshold: float | None = Field(description="The (1 - alpha) conformal quantile of the reference statistics, for plots.")
    alpha: float
    is_ood: bool | None = Field(description="p_value < alpha: the batch as a whole is atypical; null when alpha <= minimum_alpha.")
    note: str | None = Field(None, description="Why the batch was not tested, when is_ood is null (omitted otherwise).")

    @classmethod
    def of(cls, outcome: BatchTypicalityResult) -> BatchTest:
        note = None
        if outcome.is_ood is None:
            note = (
                f"not tested: alpha {outcome.alpha:g} is not above this batch size's resolution {outcome.minimum_alpha:.4g} "
                f"({outcome.reference_batches} disjoint reference batches of {outcome.size}); send smaller batches or a larger alpha"
            )
        return cls.model_construct(
            test="typicality", size=outcome.size, statistic=outcome.statistic if math.isfinite(outcome.statistic) else None,
            p_value=outcome.p_value, minimum_alpha=outcome.minimum_alpha, reference_batches=outcome.reference_batches,
            threshold=outcome.threshold, alpha=outcome.alpha, is_ood=outcome.is_ood, note=note,
        )


class ScoreResponse(BaseModel):
    """The answer to a scoring request: one result per instance, in request order, and the batch test when declared."""

    model: str
    model_version: str
    alpha: float
    results: list[InstanceResult]
    batch: BatchTest | None = Field(None, description="Omitted when the bundle declares no batch test or the batch has one instance.")

    def to_python(self) -> dict[str, Any]:
        """The JSON body as plain Python (orjson serialises it): `prediction`, `batch` and `note` only when present."""
        body = self.model_dump(exclude={"results", "batch"})
        body["results"] = [result.model_dump(exclude_none=True) for result in self.results]
        if self.batch is not None:
            body["batch"] = self.batch.model_dump(exclude={"note"} if self.batch.note is None else None)
        return body


def score_response(engine: Engine, scores: BatchScores) -> ScoreResponse:
    """The typed answer to a scored batch (labels from the manifest, the batch test when the bundle has one)."""
    outcome = engine.batch_test(scores)
    return ScoreResponse.model_construct(
        model=engine.name, model_version=engine.version, alpha=scores.alpha,
        results=scores.to_instance_results(engine.manifest.labels), batch=None if outcome is None else BatchTest.of(outcome),
    )


class SignalDescription(BaseModel):
    name: str
    kind: str
    description: str
    model: str
    output: str
    params: dict[str, Any]
    calibration_size: int


class ServedModelFile(BaseModel):
    file: str
    inputs: list[str]
    outputs: list[str]
    provider: str = Field(description="The execution provider onnxruntime actually runs this model on.")
    sha256: str


class ModelDescription(BaseModel):
    """A served model: manifest facts, signals with their calibration sizes, labels and the active providers."""

    name: str
    version: str
    description: str
    input: dict[str, Any]
    accepted_instance_shapes: list[list[int]]
    labels: list[str] | None
    default_alpha: float
    minimum_alpha: float
    signals: list[SignalDescription]
    fusion: dict[str, Any]
    calibration: dict[str, Any]
    """How the p-values are calibrated: method (split or cross_conformal), folds, guarantee, delta, statement."""
    classifier: dict[str, Any] | None
    models: dict[str, ServedModelFile]
    provider: str
    sampler: bool
    provenance: dict[str, Any]
    backbone: dict[str, Any] | None = None
    """A backbone bundle's user model (its sha256, feature and logits tensors) and declared preprocessing."""


class ModelList(BaseModel):
    default: str
    models: list[ModelDescription]


def describe_model(engine: Engine) -> ModelDescription:
    """What /v1/models and `oodserve info` show of one engine."""
    manifest = engine.manifest
    providers = engine.runner.active_providers
    calibration = engine.bundle.calibration
    return ModelDescription.model_construct(
        name=manifest.name,
        version=manifest.version,
        description=manifest.description,
        input=manifest.input.model_dump(mode="json", exclude_none=True),
        accepted_instance_shapes=accepted_instance_shapes(manifest.input.shape),
        labels=manifest.labels,
        default_alpha=manifest.default_alpha,
        minimum_alpha=engine.minimum_alpha,
        signals=[
            SignalDescription.model_construct(
                name=signal.name, kind=signal.kind, description=SIGNAL_KINDS[signal.kind].description, model=signal.model,
                output=signal.output, params=signal.params,
                calibration_size=int(calibration.held_out.get(signal.name, calibration.per_signal[signal.name]).size),
            )
            for signal in manifest.signals
        ],
        fusion={**manifest.fusion.model_dump(mode="json"), "calibration_size": int(calibration.fused.size)},
        calibration=manifest.calibration.model_dump(mode="json", exclude_none=True),
        classifier=manifest.classifier.model_dump(mode="json") if manifest.classifier is not None else None,
        backbone=manifest.backbone.model_dump(mode="json") if manifest.backbone is not None else None,
        models={
            name: ServedModelFile.model_construct(
                file=spec.file, inputs=spec.inputs, outputs=spec.outputs, provider=providers[name], sha256=manifest.files[spec.file]
            )
            for name, spec in manifest.models.items()
        },
        provider=engine.provider_summary,
        sampler=engine.sampler is not None,
        provenance=manifest.provenance.model_dump(mode="json"),
    )
