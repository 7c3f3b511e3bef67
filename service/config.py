"""Service settings: one pydantic-settings `Settings`, read from OODSERVE_* environment variables.

The bottom layer: it imports nothing of oodserve. The options each part runs with are derived where they are used
(`RuntimeOptions.from_settings`, `BatchingOptions.from_settings`, `DriftSettings.from_settings`,
`StoreOptions.from_settings`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

DEFAULT_BUNDLE = Path("models/bundles/fashion-mnist")
MEMORY_STORE = "memory"
"""OODSERVE_DRIFT_STORE of the embedded, per-process drift store (the default)."""


def _split_list(value: Any) -> Any:
    """Accept a comma-separated string or a JSON list for list settings."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            return json.loads(text)
        return [item.strip() for item in text.split(",") if item.strip()]
    return value


class Settings(BaseSettings):
    """Every setting of the service; each field `x` is read from the environment variable OODSERVE_X."""

    model_config = SettingsConfigDict(env_prefix="OODSERVE_", extra="ignore")

    bundle: Path = Field(DEFAULT_BUNDLE, description="Directory of the default bundle (served as the default model).")
    extra_bundles: Annotated[list[Path], NoDecode] = Field(
        default_factory=list, description="More bundle directories to serve by name (comma-separated)."
    )
    host: str = Field("127.0.0.1", description="Address `oodserve serve` binds to.")
    port: int = Field(8000, ge=0, le=65535, description="Port `oodserve serve` listens on.")
    providers: Annotated[list[str] | None, NoDecode] = Field(
        None,
        description="onnxruntime execution providers in order (comma-separated); default: CUDA first where available, then CPU.",
    )
    require_gpu: bool = Field(False, description="Refuse to start unless every session runs on CUDAExecutionProvider.")
    cuda_provider_options: dict[str, str] = Field(
        default_factory=dict,
        description="Options of the CUDA execution provider as a JSON object, e.g. "
        "{\"use_tf32\": \"0\", \"cudnn_conv_algo_search\": \"DEFAULT\"}.",
    )
    intra_op_threads: int = Field(
        1,
        ge=0,
        description="onnxruntime intra-op threads per session (0 = onnxruntime's default, one per core); 1 because "
        "inference threads run side by side instead (OODSERVE_INFERENCE_THREADS).",
    )
    inter_op_threads: int = Field(0, ge=0, description="onnxruntime inter-op threads per session (0 = onnxruntime's default).")
    onnxruntime_spinning: bool = Field(
        False, description="Let onnxruntime's pool threads busy-wait between runs (faster hand-off, but they take CPU from the event loop)."
    )
    allow_codec_mismatch: bool = Field(
        False, description="Serve a bundle whose signals this machine computes differently (another PNG encoder) with a warning."
    )
    warmup_batch_size: int = Field(8, ge=1, description="Instances in the warm-up run done before readiness.")
    max_batch_instances: int = Field(256, ge=1, description="Most instances one score request may carry (else 413).")
    max_body_bytes: int = Field(
        8 * 1024 * 1024, ge=1024, description="Largest request body in bytes, checked before and while it is read (else 413)."
    )
    grpc_port: int | None = Field(
        None, ge=0, le=65535, description="Serve KServe v2 gRPC on this port beside HTTP (same host); unset = off, 0 = any free port."
    )
    console: bool = Field(True, description="Serve the browser console at / and the API docs at /docs (assets shipped in the package).")
    ood_rate_window: int = Field(1000, ge=1, description="Last verdicts per model that the oodserve_ood_rate gauge averages.")
    # Drift: online conformal tests per model and stream (service/drift).
    drift: bool = Field(True, description="Run the online exchangeability test and change detector on every model's stream.")
    drift_delta: float = Field(
        0.01, gt=0, lt=1, description="Martingale alarm at 1/delta: the probability of any false alarm on a clean stream is at most delta."
    )
    drift_change_threshold: float = Field(
        1e8, gt=1, description="Shiryaev-Roberts alarm threshold: the mean number of clean inputs before a false change alarm is at "
        "least this."
    )
    drift_max_streams: int = Field(
        32, ge=1, description="Most streams (X-OOD-Stream values) kept at once; the least recently used is dropped."
    )
    drift_max_stream_inputs: int = Field(
        100_000, ge=100, description="A stream restarts after this many inputs (bounded memory); each segment keeps its guarantee."
    )
    drift_store: str = Field(
        MEMORY_STORE,
        description="Where the drift streams live: `memory` (this process only) or a Valkey/Redis URL (redis://HOST:PORT/DB, "
        "rediss://..., unix:///path) shared by every replica, so a deployment keeps one guarantee per stream.",
    )
    drift_store_password: SecretStr | None = Field(
        None, description="Password of the drift store (overrides one in the URL; e.g. from a Kubernetes Secret)."
    )
    drift_store_timeout_ms: float = Field(
        50.0, gt=0, le=10_000, description="Longest one drift store call may take; scoring never waits on the store at all."
    )
    drift_store_buffer_inputs: int = Field(
        50_000, ge=1, description="Inputs a replica holds while the drift store is slow or down; beyond that the oldest are "
        "dropped and their streams restart (reason `gap`) once the store is back."
    )
    drift_store_prefix: str = Field("oodserve:drift", min_length=1, description="Prefix of every drift store key.")
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="Log level of the service.")
    lean_routes: bool = Field(
        True,
        description="Answer POST score and infer requests on a lean ASGI path (same checks, errors and metrics) instead of "
        "FastAPI's routing and dependency solving, which cost more per request than scoring one image.",
    )
    access_log: bool = Field(False, description="Log every HTTP request (uvicorn's access log); the request metrics count them either way.")
    # Dynamic batching.
    batching: bool = Field(
        True, description="Merge concurrent score requests into one onnxruntime run per model (false: one run per request)."
    )
    batch_max_size: int = Field(64, ge=1, description="Most instances in one merged onnxruntime run; larger requests are split.")
    inference_threads: int = Field(
        0, ge=0, description="Merged runs in flight at once, each in its own thread (0 = one per CPU core)."
    )
    batch_max_delay_ms: float = Field(
        0.0, ge=0, description="How long a batch may wait to fill up (for requests being read, or after a run that left requests "
        "waiting) while another merged run keeps a core busy, or always with one inference thread (whose idle core the event "
        "loop uses meanwhile). 0 = work-conserving: an idle inference thread takes what is queued at once.",
    )
    batch_min_beside_run: int = Field(
        8, ge=0, description="A merged run starts beside one already in flight only once this many instances are queued; fewer "
        "wait for the running one to end. Fuller runs under load, no wait for a lone request; 0 = any queued instance starts a run.",
    )
    batch_side_by_side_max: int = Field(
        8, ge=0, description="A merged run of at most this many instances that finds no other run in flight runs the bundle's "
        "models side by side in two threads (lower latency on a quiet service); 0 = never."
    )
    batch_queue_capacity: int = Field(
        4096, ge=1, description="Most instances waiting per model; more are refused with 503 and Retry-After "
        "(4096 holds 64 clients of 32 images each)."
    )
    batch_deadline_seconds: float = Field(
        10.0, gt=0, description="Longest a score request may spend queued plus in its merged run (else 504)."
    )
    # Reliability and security.
    api_keys: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list, description="Bearer keys for scoring and model endpoints (comma-separated); empty = open."
    )
    admin_keys: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list, description="Bearer keys for /v1/admin (comma-separated); empty = admin endpoints disabled."
    )
    protect_metrics: bool = Field(False, description="Require a scoring or admin key on /metrics.")
    max_json_depth: int = Field(32, ge=4, description="Deepest JSON nesting of a request body (else 400).")
    request_timeout_seconds: float = Field(
        30.0, gt=0, description="Longest time one request may take before it is answered 504 (admin endpoints exempt)."
    )
    max_concurrent_connections: int = Field(
        128, ge=1, description="Connections and requests uvicorn serves at once before answering 503 (uvicorn limit_concurrency)."
    )
    keep_alive_seconds: float = Field(
        20.0,
        gt=0,
        description="Idle keep-alive connections are closed after this; above the clients' own idle expiry (httpx: 5 s) "
        "so they close first.",
    )
    shutdown_grace_seconds: float = Field(
        30.0, gt=0, description="On SIGTERM, how long in-flight requests may run before they are cancelled."
    )
    reload_on_sighup: bool = Field(True, description="Reload the bundles (verified, warmed up, swapped atomically) on SIGHUP.")

    @field_validator("extra_bundles", "providers", "api_keys", "admin_keys", mode="before")
    @classmethod
    def _lists_from_text(cls, value: Any) -> Any:
        return _split_list(value)

    @field_validator("drift_store")
    @classmethod
    def _drift_store_url(cls, value: str) -> str:
        if value != MEMORY_STORE and not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(f"OODSERVE_DRIFT_STORE must be `memory` or a redis://, rediss:// or unix:// URL, got {value[:80]!r}")
        return value

    @model_validator(mode="after")
    def _metrics_protection_needs_keys(self) -> Settings:
        if self.protect_metrics and not (self.api_keys or self.admin_keys):
            raise ValueError("OODSERVE_PROTECT_METRICS=true needs OODSERVE_API_KEYS or OODSERVE_ADMIN_KEYS")
        return self
