"""`oodserve bench --load`: a bounded load and soak run over loopback HTTP.

A fixed number of score requests (default 20,000) from a fixed number of concurrent keep-alive clients
(default 64), stopped early at a wall-clock bound, against a server on 127.0.0.1 only: started here from
a bundle (`python -m oodserve.cli serve`) or already running (--url, with --server-pid for its memory).
Prints the status and transport-error counts, latency percentiles, throughput and the resident memory of
the server process (/proc/PID/status) after warm-up, at the end and at its peak. Errors are everything but
200 and 503 (backpressure); the run fails (exit 1) when there is any.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from ipaddress import ip_address
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np

from oodserve.bench.http_driver import Outcomes, ServerProcess, request_bodies, run_client, send_requests
from oodserve.bench.throughput import load_bench_images

BACKPRESSURE_STATUS = 503
RSS_SAMPLE_SECONDS = 0.5


@dataclass(frozen=True)
class LoadOptions:
    """One load run: where (bundle to start, or a running loopback url), how much, how long at most."""

    bundle: Path | None = None
    url: str | None = None
    server_pid: int | None = None
    requests: int = 20_000
    concurrency: int = 64
    max_seconds: float = 900.0
    warmup_requests: int = 200
    instances_per_request: int = 1
    body: str = "json"
    images: Path | None = None
    distinct_bodies: int = 256
    api_key: str | None = None
    server_log: Path | None = None
    seed: int = 0


@dataclass
class LoadReport(Outcomes):
    """What happened: statuses, transport errors, latencies of the measured requests, memory of the server."""

    requests_planned: int = 0
    concurrency: int = 1
    instances_per_request: int = 1
    wall_seconds: float = 0.0
    rss_after_warmup_kib: int | None = None
    rss_end_kib: int | None = None
    rss_peak_during_run_kib: int | None = None
    rss_high_water_kib: int | None = None
    rss_trend_kib: list[tuple[int, int]] = field(default_factory=list)  # (requests answered so far, VmRSS)

    @property
    def sent(self) -> int:
        return sum(self.statuses.values()) + sum(self.transport_errors.values())

    @property
    def errors(self) -> int:
        """Failed requests: transport errors and every status other than 200 and 503 backpressure."""
        bad_statuses = sum(count for status, count in self.statuses.items() if status not in (200, BACKPRESSURE_STATUS))
        return bad_statuses + sum(self.transport_errors.values())

    @property
    def rss_growth_kib(self) -> int | None:
        if self.rss_after_warmup_kib is None or self.rss_end_kib is None:
            return None
        return self.rss_end_kib - self.rss_after_warmup_kib


def require_loopback(url: str) -> None:
    """Refuse any target that is not this machine (127.0.0.0/8, ::1 or localhost)."""
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return
    try:
        if ip_address(host).is_loopback:
            return
    except ValueError:
        pass
    raise ValueError(f"the load run only targets loopback addresses (127.0.0.1, ::1, localhost), not {host or url!r}")


def resident_memory_kib(pid: int) -> tuple[int, int] | None:
    """(VmRSS, VmHWM) of a process in KiB from /proc/PID/status; None where unavailable."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    values = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0])
    if "VmRSS" not in values:
        return None
    return values["VmRSS"], values.get("VmHWM", values["VmRSS"])


async def drive(url: str, bodies: list[bytes], content_type: str, options: LoadOptions, server_pid: int | None) -> LoadReport:
    """Warm up, then send options.requests requests from options.concurrency workers (or stop at the time bound),
    sampling the server's resident memory meanwhile."""
    # Warm-up at full concurrency, so merged batch sizes and onnxruntime's arenas reach their steady state
    # before the memory baseline is read.
    await send_requests(url, bodies, content_type, options.concurrency, options.warmup_requests, options.api_key)
    report = LoadReport(
        requests_planned=options.requests, concurrency=options.concurrency, instances_per_request=options.instances_per_request
    )
    if server_pid is not None and (memory := resident_memory_kib(server_pid)) is not None:
        report.rss_after_warmup_kib = memory[0]
        report.rss_peak_during_run_kib = memory[0]
        report.rss_trend_kib.append((0, memory[0]))
    finished = asyncio.Event()

    async def sample_memory() -> None:
        while not finished.is_set() and server_pid is not None:
            memory = resident_memory_kib(server_pid)
            if memory is not None and report.rss_peak_during_run_kib is not None:
                report.rss_peak_during_run_kib = max(report.rss_peak_during_run_kib, memory[0])
                report.rss_trend_kib.append((len(report.latencies), memory[0]))
            try:
                await asyncio.wait_for(finished.wait(), RSS_SAMPLE_SECONDS)
            except TimeoutError:
                pass

    sampler = asyncio.create_task(sample_memory())
    started = time.perf_counter()
    await send_requests(url, bodies, content_type, options.concurrency, options.requests, options.api_key, options.max_seconds, report)
    report.wall_seconds = time.perf_counter() - started
    finished.set()
    await sampler
    if server_pid is not None and (memory := resident_memory_kib(server_pid)) is not None:
        report.rss_end_kib, report.rss_high_water_kib = memory
    return report


def input_shape_of(url: str, api_key: str | None) -> list[int]:
    """The default model's per-instance input shape, from GET /v1/models."""
    import httpx

    headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
    response = httpx.get(f"{url}/v1/models", headers=headers, timeout=30)
    if response.status_code != 200:
        raise ValueError(f"cannot read the served models from {url}/v1/models: {response.status_code} {response.text[:200]}")
    listing = response.json()
    default = next(model for model in listing["models"] if model["name"] == listing["default"])
    return list(default["input"]["shape"])


def run_load(options: LoadOptions) -> LoadReport:
    """Start a server from options.bundle (or use options.url), run the load, stop the server."""

    if options.url is None and options.bundle is None:
        raise ValueError("give a bundle to serve or the url of a running loopback server")

    def load_against(url: str, server_pid: int | None) -> LoadReport:
        shape = input_shape_of(url, options.api_key)
        count = options.distinct_bodies * options.instances_per_request
        images = load_bench_images(options.images, shape, count, options.seed)
        bodies, content_type = request_bodies(images, options.body, options.instances_per_request)
        return run_client(drive(url, bodies, content_type, options, server_pid))

    if options.url is not None:
        require_loopback(options.url)
        return load_against(options.url.rstrip("/"), options.server_pid)
    with ServerProcess(options.bundle, {}, options.server_log) as server:  # type: ignore[arg-type]
        return load_against(server.url, server.process.pid)


def trend_points(samples: list[tuple[int, int]], points: int = 6) -> list[tuple[int, int]]:
    """About `points` samples spread evenly over the run (first and last included)."""
    if len(samples) <= points:
        return samples
    chosen = np.linspace(0, len(samples) - 1, points).round().astype(int)
    return [samples[index] for index in dict.fromkeys(chosen.tolist())]


def _mib(kib: int | None) -> str:
    return "n/a" if kib is None else f"{kib / 1024:.1f} MiB"


def format_load_report(report: LoadReport) -> str:
    """The figures of one run as aligned text."""
    latencies_ms = np.asarray(report.latencies, dtype=np.float64) * 1000.0
    quantiles = (
        " ".join(f"p{q}={np.percentile(latencies_ms, q):.1f} ms" for q in (50, 90, 99)) + f" max={latencies_ms.max():.1f} ms"
        if latencies_ms.size
        else "n/a"
    )
    answered = sum(report.statuses.values())
    throughput = answered / report.wall_seconds if report.wall_seconds > 0 else 0.0
    statuses = ", ".join(f"{status}: {count}" for status, count in sorted(report.statuses.items())) or "none"
    transport = ", ".join(f"{name}: {count}" for name, count in sorted(report.transport_errors.items())) or "none"
    growth = report.rss_growth_kib
    lines = [
        f"load       {report.sent} of {report.requests_planned} requests sent at concurrency {report.concurrency}, "
        f"{report.instances_per_request} instance(s) each" + (" (stopped at the time bound)" if report.stopped_at_time_bound else ""),
        f"statuses   {statuses}",
        f"transport  {transport}",
        f"errors     {report.errors} (everything but 200 and 503 backpressure; 503: {report.statuses.get(BACKPRESSURE_STATUS, 0)})",
        f"latency    {quantiles}",
        f"throughput {throughput:.1f} requests/s, {throughput * report.instances_per_request:.1f} images/s "
        f"over {report.wall_seconds:.1f} s",
        f"memory     server RSS after warm-up {_mib(report.rss_after_warmup_kib)}, at the end {_mib(report.rss_end_kib)}, "
        f"growth {'n/a' if growth is None else f'{growth / 1024:+.1f} MiB'}; peak during the run "
        f"{_mib(report.rss_peak_during_run_kib)}, process high-water {_mib(report.rss_high_water_kib)}",
    ]
    if len(report.rss_trend_kib) > 2:
        lines.append(
            "rss trend  "
            + ", ".join(f"{done}: {kib / 1024:.1f}" for done, kib in trend_points(report.rss_trend_kib))
            + " (requests answered: MiB)"
        )
    return "\n".join(lines)
