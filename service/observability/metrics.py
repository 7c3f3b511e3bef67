"""Prometheus metrics of the service (oodserve_ prefix, base units) and the ASGI middleware that counts requests."""

from __future__ import annotations

import math
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from oodserve.drift.store import DriftStore
from oodserve.observability.batched_histogram import BatchedHistogram
from oodserve.runtime.batching import REFUSAL_REASONS, BatchScheduler
from oodserve.runtime.providers import available_providers as onnxruntime_providers
from oodserve.scoring.pipeline import BatchScores

if TYPE_CHECKING:
    from oodserve.engine import Engine

disable_created_metrics()  # the *_created series only double the exposition size

P_VALUE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
"""Fine at the usual alphas (0.001..0.1) and in deciles above, so `histogram_quantile` can check uniformity."""
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
VERDICTS = ("ood", "in_distribution")
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
"""Methods kept as label values; anything else a client sends is counted as "other" (bounded labels)."""
RELOAD_RESULTS = ("success", "failure")
"""The only values of oodserve_bundle_reloads_total{result} (bounded label set)."""
DEFAULT_OOD_RATE_WINDOW = 1000


class VerdictWindow:
    """The last `size` verdicts of one model (True = OOD) and their OOD fraction; thread-safe."""

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError(f"the verdict window needs at least one slot, got {size}")
        self.size = size
        self._verdicts: deque[bool] = deque()
        self._ood_count = 0
        self._lock = threading.Lock()

    def add(self, verdicts: Iterable[bool]) -> float:
        """Append verdicts in order (the oldest fall out beyond `size`) and return the new OOD fraction."""
        with self._lock:
            for verdict in verdicts:
                flag = bool(verdict)
                self._verdicts.append(flag)
                self._ood_count += flag
                if len(self._verdicts) > self.size:
                    self._ood_count -= self._verdicts.popleft()
            return self._ood_count / len(self._verdicts) if self._verdicts else float("nan")

    def __len__(self) -> int:
        return len(self._verdicts)

    def counts(self) -> tuple[int, int]:
        """(verdicts held, OOD verdicts among them)."""
        with self._lock:
            return len(self._verdicts), self._ood_count


class DriftCollector(Collector):
    """The streams' online tests, read from the drift store at scrape time (nothing on the request path).
    Labels are bounded: at most OODSERVE_DRIFT_MAX_STREAMS streams live at once, dropped ones disappear. With a shared
    store every replica exports the same streams (aggregate with max by (model, stream)); while the store cannot
    answer, oodserve_drift_store_up is 0 and no stream series are exported."""

    def __init__(self, monitor: DriftStore) -> None:
        self.monitor = monitor

    def collect(self) -> Iterator[Metric]:
        snapshot = self.monitor.snapshot()
        reports = snapshot.reports
        stream_labels = ["model", "stream"]
        families: dict[str, GaugeMetricFamily | CounterMetricFamily] = {
            "martingale": GaugeMetricFamily(
                "oodserve_drift_log10_martingale",
                "log10 of the stream's conformal test martingale; alarm at log10(1/delta) (Ville: P(any false alarm) <= delta).",
                labels=stream_labels,
            ),
            "martingale_max": GaugeMetricFamily(
                "oodserve_drift_log10_martingale_max", "Largest log10 martingale since the stream's last restart.", labels=stream_labels
            ),
            "change": GaugeMetricFamily(
                "oodserve_drift_log10_change_statistic",
                "log10 of the stream's conformal Shiryaev-Roberts statistic; alarm at log10(OODSERVE_DRIFT_CHANGE_THRESHOLD).",
                labels=stream_labels,
            ),
            "inputs": GaugeMetricFamily("oodserve_drift_inputs_since_reset", "Inputs the stream's tests saw since their restart.",
                                        labels=stream_labels),
            "alarm": GaugeMetricFamily("oodserve_drift_alarm", "1 while the stream's test is in alarm (until a restart), by test.",
                                       labels=[*stream_labels, "test"]),
            "alarms": CounterMetricFamily("oodserve_drift_alarms", "Alarms raised on the stream, by test (martingale or change).",
                                          labels=[*stream_labels, "test"]),
        }
        for report in reports:
            labels = [report.model, report.stream]
            families["martingale"].add_metric(labels, report.log10_martingale)
            families["martingale_max"].add_metric(labels, report.log10_martingale_max)
            families["change"].add_metric(labels, report.log10_change_statistic if report.log10_change_statistic > -1e300 else -300.0)
            families["inputs"].add_metric(labels, report.inputs_since_reset)
            families["alarm"].add_metric([*labels, "martingale"], float(report.alarm))
            families["alarm"].add_metric([*labels, "change"], float(report.change_alarm))
            for test, count in report.alarms_total.items():
                families["alarms"].add_metric([*labels, test], count)
        yield from families.values()
        yield GaugeMetricFamily("oodserve_drift_alarm_threshold_log10", "log10(1/delta): where the martingale alarms.",
                                value=-math.log10(self.monitor.settings.delta))
        evicted = CounterMetricFamily("oodserve_drift_streams_evicted", "Streams dropped as least recently used beyond the limit.",
                                      labels=["model"])
        for model, count in sorted(snapshot.evicted.items()):
            evicted.add_metric([model], count)
        yield evicted
        restarts = CounterMetricFamily("oodserve_drift_restarts",
                                       "Stream restarts by reason: bound, reload, admin or gap (inputs lost while the store was away).",
                                       labels=["model", "reason"])
        for (model, reason), count in sorted(snapshot.restarts.items()):
            restarts.add_metric([model, reason], count)
        yield restarts
        store = snapshot.store
        yield _store_up(store)
        yield GaugeMetricFamily("oodserve_drift_store_pending_inputs", "Inputs this replica holds for the drift store (sent in order "
                                "once it answers).", value=float(store.get("pending_inputs", 0)))
        yield CounterMetricFamily("oodserve_drift_store_dropped_inputs", "Inputs dropped because the drift store stayed away longer "
                                  "than the buffer lasts (their streams restart, reason gap).", value=float(store.get("dropped_inputs", 0)))
        yield CounterMetricFamily("oodserve_drift_store_errors", "Drift store calls that failed or timed out.",
                                  value=float(store.get("errors", 0)))


def _store_up(store: dict[str, object]) -> GaugeMetricFamily:
    family = GaugeMetricFamily("oodserve_drift_store_up", "1 while the drift store answers and this replica's updates reach it, "
                               "else 0 (drift reports `unavailable`; scoring goes on).", labels=["kind"])
    family.add_metric([str(store.get("kind", "memory"))], 1.0 if store.get("status") == "ok" else 0.0)
    return family


class SchedulerCollector(Collector):
    """The dynamic batcher's queue depth, capacity and refusals, read from the scheduler at scrape time
    (nothing on the request path). Every tracked model has both refusal series from zero, so rate() works."""

    def __init__(self, scheduler: BatchScheduler, models: Callable[[], Iterable[str]]) -> None:
        self.scheduler = scheduler
        self.models = models

    def collect(self) -> Iterator[Metric]:
        models = set(self.models())
        depth_by_model = self.scheduler.queued_instances_by_model()
        depth = GaugeMetricFamily(
            "oodserve_queue_instances", "Instances waiting in the dynamic-batching queue now, per model.", labels=["model"]
        )
        for model in sorted(models | set(depth_by_model)):
            depth.add_metric([model], depth_by_model.get(model, 0))
        yield depth
        yield GaugeMetricFamily(
            "oodserve_queue_capacity_instances",
            "Most instances one model's queue holds; beyond it score requests get 503 with Retry-After.",
            value=self.scheduler.options.queue_capacity,
        )
        counts = {**{(model, reason): 0 for model in models for reason in REFUSAL_REASONS}, **self.scheduler.refusals}
        refused = CounterMetricFamily(
            "oodserve_requests_refused",
            "Score requests the scheduler refused: reason queue_full (503 + Retry-After) or deadline (504).",
            labels=["model", "reason"],
        )
        for (model, reason), count in sorted(counts.items()):
            refused.add_metric([model, reason], count)
        yield refused


class ServiceMetrics:
    """All metrics in one private registry (so several apps in one process never collide).

    Hooks for other parts of the service:
    - `track_registry(registry)`: after (re)loading bundles; sets model_info/default_alpha and makes
      every engine's ModelRunner report inference time and batch size (`observe_inference`).
    - `record_reload(result, registry=None)`: one bundle reload attempt, result "success" or "failure";
      pass the new registry on success so the per-model series follow it.
    - `observe_queue_wait(model, seconds)`: time a request waited in the dynamic-batching queue.
    - `observe_batch(model, scores, seconds)`: one scored request (verdicts at its alpha, OOD rate, size, time).
    - `observe_scored_instances(model, scores)`: per-signal and fused p-values of one onnxruntime batch, hooked
      into each engine by `track_registry` (so a request cancelled after its run still counts there).
    Batch sizes are recorded by ModelRunner.run itself (once per onnxruntime batch), never by callers.
    """

    def __init__(self, registry: CollectorRegistry | None = None, ood_rate_window: int = DEFAULT_OOD_RATE_WINDOW) -> None:
        self.registry = registry or CollectorRegistry()
        self.ood_rate_window = ood_rate_window
        self._windows: dict[str, VerdictWindow] = {}
        self._windows_lock = threading.Lock()
        self._tracked_models: set[str] = set()
        self._request_series: dict[str, _RequestSeries] = {}
        self.http_requests = Counter(
            "oodserve_http_requests",
            "HTTP requests by route template, method and status code.",
            ["endpoint", "method", "status"],
            registry=self.registry,
        )
        self.grpc_requests = Counter(
            "oodserve_grpc_requests",
            "KServe v2 gRPC calls by method and status code.",
            ["method", "code"],
            registry=self.registry,
        )
        self.grpc_request_duration = Histogram(
            "oodserve_grpc_request_duration_seconds",
            "KServe v2 gRPC call duration by method.",
            ["method"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.http_request_duration = Histogram(
            "oodserve_http_request_duration_seconds",
            "Wall time of HTTP requests by route template and method.",
            ["endpoint", "method"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.inputs_scored = Counter(
            "oodserve_inputs_scored",
            "Instances scored, by model and verdict (ood or in_distribution).",
            ["model", "verdict"],
            registry=self.registry,
        )
        self.signal_p_value = BatchedHistogram(
            "oodserve_signal_p_value",
            "Conformal p-value of each signal per scored instance (uniform on in-distribution data).",
            ["model", "signal"],
            P_VALUE_BUCKETS,
        )
        self.fused_p_value = BatchedHistogram(
            "oodserve_fused_p_value",
            "Conformal p-value of the fused statistic per scored instance; is_ood when below alpha.",
            ["model"],
            P_VALUE_BUCKETS,
        )
        self.registry.register(self.signal_p_value)
        self.registry.register(self.fused_p_value)
        self.ood_rate = Gauge(
            "oodserve_ood_rate",
            f"Fraction of OOD verdicts among the model's last {ood_rate_window} scored instances.",
            ["model"],
            registry=self.registry,
        )
        self.default_alpha = Gauge(
            "oodserve_default_alpha",
            "The bundle's default_alpha: the OOD rate expected on in-distribution traffic.",
            ["model"],
            registry=self.registry,
        )
        self.request_instances = Histogram(
            "oodserve_request_instances",
            "Instances per score request.",
            ["model"],
            buckets=BATCH_BUCKETS,
            registry=self.registry,
        )
        self.batch_instances = Histogram(
            "oodserve_batch_instances",
            "Instances per onnxruntime batch (several requests when the dynamic batcher merges them).",
            ["model"],
            buckets=BATCH_BUCKETS,
            registry=self.registry,
        )
        self.queue_wait = Histogram(
            "oodserve_queue_wait_seconds",
            "Time a score request waited in the dynamic-batching queue before its batch ran.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.inference_duration = Histogram(
            "oodserve_inference_duration_seconds",
            "onnxruntime run time of one batch, per ONNX model of the bundle.",
            ["model", "onnx_model"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.scoring_duration = Histogram(
            "oodserve_scoring_duration_seconds",
            "Time to validate and score one request's batch (onnxruntime plus numpy).",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.model_info = Gauge(
            "oodserve_model_info",
            "Served bundles: name, version and the active onnxruntime execution provider (value 1).",
            ["model", "version", "provider"],
            registry=self.registry,
        )
        self.provider_available = Gauge(
            "oodserve_execution_provider_available",
            "1 for every execution provider compiled into the installed onnxruntime (CUDA here means a GPU build).",
            ["provider"],
            registry=self.registry,
        )
        self.bundle_reloads = Counter(
            "oodserve_bundle_reloads",
            "Bundle reload attempts by result (success or failure).",
            ["result"],
            registry=self.registry,
        )
        for result in RELOAD_RESULTS:
            self.bundle_reloads.labels(result=result)
        self.ready = Gauge("oodserve_ready", "1 when bundles are loaded and warmed up, else 0.", registry=self.registry)

    def track_registry(self, engines: Iterable[Engine], available_providers: Iterable[str] | None = None) -> None:
        """Make the per-model series describe exactly `engines` (an EngineRegistry or a list of engines).

        Sets oodserve_model_info, oodserve_default_alpha and zero verdict counters per model, drops the
        series of models no longer served, and hooks every engine's ModelRunner so that each onnxruntime
        batch is timed per ONNX model. `available_providers` defaults to onnxruntime's list.
        """
        if available_providers is None:

            available_providers = onnxruntime_providers()
        engines = list(engines)
        self.model_info.clear()
        served = {engine.name for engine in engines}
        for gone in self._tracked_models - served:
            self.default_alpha.remove(gone)
            try:
                self.ood_rate.remove(gone)
            except KeyError:
                pass
            with self._windows_lock:
                self._windows.pop(gone, None)
            self._request_series.pop(gone, None)
        for engine in engines:
            self.model_info.labels(model=engine.name, version=engine.version, provider=engine.provider_summary).set(1)
            self.default_alpha.labels(model=engine.name).set(engine.default_alpha)
            for verdict in VERDICTS:
                self.inputs_scored.labels(model=engine.name, verdict=verdict)
            engine.runner.observer = partial(self.observe_inference, engine.name)
            engine.scores_observer = partial(self.observe_scored_instances, engine.name)
        self._tracked_models = served
        self.provider_available.clear()
        for provider in available_providers:
            self.provider_available.labels(provider=provider).set(1)

    def track_drift(self, monitor: DriftStore) -> None:
        """Export every stream's drift tests (read at each scrape)."""
        self.registry.register(DriftCollector(monitor))

    def track_scheduler(self, scheduler: BatchScheduler) -> None:
        """Export the scheduler's queue depth, capacity and refusal counts (read at each scrape)."""
        self.registry.register(SchedulerCollector(scheduler, lambda: sorted(self._tracked_models)))

    def record_reload(self, result: str, engines: Iterable[Engine] | None = None) -> None:
        """Count one reload attempt; result is "success" or "failure". On success pass the new engines."""
        if result not in RELOAD_RESULTS:
            raise ValueError(f"reload result must be one of {RELOAD_RESULTS}, got {result!r}")
        if engines is not None:
            self.track_registry(engines)
        self.bundle_reloads.labels(result=result).inc()

    def observe_queue_wait(self, model: str, seconds: float) -> None:
        """Time one score request spent queued for the dynamic batcher (enqueue to batch start)."""
        self.queue_wait.labels(model=model).observe(seconds)

    def observe_batch_size(self, model: str, instances: int) -> None:
        """Instances in one onnxruntime batch; called by ModelRunner.run through `observe_inference`."""
        self.batch_instances.labels(model=model).observe(instances)

    def observe_inference(self, model: str, instances: int, seconds_per_onnx_model: Mapping[str, float]) -> None:
        """One onnxruntime batch of `instances` through every ONNX model of bundle `model` (the runner hook)."""
        self.observe_batch_size(model, instances)
        for onnx_model, seconds in seconds_per_onnx_model.items():
            self.inference_duration.labels(model=model, onnx_model=onnx_model).observe(seconds)

    def observe_grpc(self, method: str, code: str, seconds: float) -> None:
        """One gRPC call: its method, final status code name and duration."""
        self.grpc_requests.labels(method=method, code=code).inc()
        self.grpc_request_duration.labels(method=method).observe(seconds)

    def verdict_window(self, model: str) -> VerdictWindow:
        with self._windows_lock:
            window = self._windows.get(model)
            if window is None:
                window = self._windows[model] = VerdictWindow(self.ood_rate_window)
            return window

    def observe_scored_instances(self, model: str, scores: BatchScores) -> None:
        """Per-signal and fused p-values of one scored onnxruntime batch (the engine hook: once per merged run,
        whichever requests it serves), each series in one vectorised update."""
        if scores.p_values:
            self.signal_p_value.observe_rows([(model, signal) for signal in scores.p_values], np.stack(list(scores.p_values.values())))
        self.fused_p_value.observe_many((model,), scores.fused_p_value)

    def _series(self, model: str) -> _RequestSeries:
        series = self._request_series.get(model)
        if series is None:
            series = self._request_series[model] = _RequestSeries(
                ood=self.inputs_scored.labels(model=model, verdict="ood"),
                in_distribution=self.inputs_scored.labels(model=model, verdict="in_distribution"),
                ood_rate=self.ood_rate.labels(model=model),
                window=self.verdict_window(model),
                request_instances=self.request_instances.labels(model=model),
                scoring_duration=self.scoring_duration.labels(model=model),
            )
        return series

    def observe_batch(self, model: str, scores: BatchScores, seconds: float) -> None:
        """Record one scored request: verdict counts at its alpha, OOD rate, size, time (p-values: `observe_scored_instances`)."""
        series = self._series(model)
        batch_size = int(scores.is_ood.size)
        ood_count = int(np.count_nonzero(scores.is_ood))
        series.ood.inc(ood_count)
        series.in_distribution.inc(batch_size - ood_count)
        series.ood_rate.set(series.window.add(scores.is_ood.tolist()))
        series.request_instances.observe(batch_size)
        series.scoring_duration.observe(seconds)


@dataclass(frozen=True)
class _RequestSeries:
    """One model's labelled children of the per-request metrics, looked up once (labels() takes a lock and builds a key)."""

    ood: Any
    in_distribution: Any
    ood_rate: Any
    window: VerdictWindow
    request_instances: Any
    scoring_duration: Any
