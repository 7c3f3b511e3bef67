"""`oodserve bench`: the raw onnxruntime limit of a bundle against the service over loopback HTTP.

One run measures, in this order and never two things at once:
1. raw onnxruntime: every model of the bundle on one batch (ModelRunner.run) at several batch sizes,
   from one thread and from one thread per inference thread side by side; the best images/s is the
   limit; batch-1 runs give the raw single-image latency. Also the raw engine
   (onnxruntime plus the numpy scoring), since the service cannot beat it either. The sweep runs once
   before and once after the servers and the better figures count, so a noisy moment cannot lower
   the limit the service is compared with.
2. the service with dynamic batching, as a `python -m oodserve.cli serve` subprocess on 127.0.0.1,
   loaded by the benchmarks' HTTP driver at each concurrency with JSON and with .npy bodies (one image each);
3. the same bundle served naively (OODSERVE_BATCHING=false: one onnxruntime run per request).
The load client runs in this process, on the same machine as the server, and its CPU use is part of
what the service figures pay for.
"""

from __future__ import annotations

import os
import platform
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from oodserve.bench.http_driver import ServerProcess, request_bodies, run_client, send_requests
from oodserve.config import Settings
from oodserve.datasets import read_idx
from oodserve.engine import Engine
from oodserve.runtime.sessions import RuntimeOptions

LATENCY_PERCENTILES = (50, 99)


@dataclass(frozen=True)
class BenchOptions:
    """What to measure: bundle, concurrencies, requests per cell, raw batch sizes and time, bodies, images."""

    bundle: Path
    concurrency: tuple[int, ...] = (1, 4, 16, 64)
    requests: int = 2000
    warmup_requests: int = 50
    raw_batch_sizes: tuple[int, ...] = (1, 8, 32, 64, 128, 256)
    raw_seconds: float = 3.0
    single_image_runs: int = 500
    bodies: tuple[str, ...] = ("json", "npy")
    images_per_request: tuple[int, ...] = (1,)
    raw_threads: int = 1
    side_by_side: bool = False
    """Also time single images with the bundle's models side by side (as the service runs a lone small request)."""
    naive: bool = True
    images: Path | None = None
    server_env: tuple[tuple[str, str], ...] = ()
    server_log: Path | None = None
    seed: int = 0
    api_key: str | None = None


@dataclass
class BenchRow:
    """One line of the table; None where a column does not apply."""

    section: str
    body: str
    concurrency: int | None
    detail: str
    images_per_second: float
    p50_ms: float | None = None
    p99_ms: float | None = None
    ratio_to_limit: float | None = None
    errors: int = 0
    server_cpu_ms_per_image: float | None = None
    client_cpu_ms_per_image: float | None = None
    mean_run_batch: float | None = None


def load_bench_images(path: Path | None, input_shape: Sequence[int], count: int, seed: int) -> np.ndarray:
    """`count` images (count, *input_shape) uint8: from an IDX or .npy file, else smooth random blobs."""
    rng = np.random.default_rng(seed)
    if path is not None:
        images = np.load(path, allow_pickle=False) if path.suffix == ".npy" else read_idx(path)
        chosen = images[rng.choice(images.shape[0], size=count, replace=images.shape[0] < count)]
        return np.ascontiguousarray(chosen.reshape((count, *input_shape)), dtype=np.uint8)
    size = int(np.prod(input_shape))
    side = int(round(size**0.5))
    grid_y, grid_x = np.mgrid[0:side, 0:side] / side
    blobs = []
    for _ in range(count):
        centre = rng.uniform(0.3, 0.7, 2)
        spread = rng.uniform(0.05, 0.25, 2)
        blob = np.exp(-(((grid_x - centre[0]) / spread[0]) ** 2 + ((grid_y - centre[1]) / spread[1]) ** 2))
        noisy = 255.0 * blob + rng.normal(0.0, 8.0, blob.shape)
        blobs.append(np.clip(np.rint(noisy), 0, 255).reshape(-1)[:size])
    return np.asarray(blobs, dtype=np.uint8).reshape((count, *input_shape))


def percentile_ms(seconds: Sequence[float], percentile: float) -> float:
    return float(np.percentile(np.asarray(seconds, dtype=np.float64), percentile) * 1000.0)


@dataclass
class RawMeasurement:
    """One raw sweep: images/s per batch size, batch-1 latencies (seconds, one model after another and,
    when measured, side by side), raw engine images/s."""

    throughput: dict[int, float]
    single_seconds: list[float]
    engine_throughput: float
    single_side_by_side_seconds: list[float] = field(default_factory=list)

    def best_of(self, other: RawMeasurement) -> RawMeasurement:
        """Noise (other processes) only slows runs down, so the better of two sweeps estimates the limit."""
        return RawMeasurement(
            {size: max(value, other.throughput.get(size, 0.0)) for size, value in self.throughput.items()},
            _faster(self.single_seconds, other.single_seconds),
            max(self.engine_throughput, other.engine_throughput),
            _faster(self.single_side_by_side_seconds, other.single_side_by_side_seconds),
        )


def _faster(first: list[float], second: list[float]) -> list[float]:
    """The set of latencies with the lower median (an empty set loses)."""
    if not first or not second:
        return first or second
    return first if np.median(first) <= np.median(second) else second


def parallel_runs_per_second(engine: Any, batch: np.ndarray, threads: int, seconds: float, score: bool = False) -> float:
    """Images/s of `threads` threads each running ModelRunner.run(batch) (or Engine.score with score=True)
    back to back for `seconds` (3 runs at least)."""
    counts = [0] * threads
    run = engine.score if score else engine.runner.run

    def work(index: int, stop: float) -> None:
        while counts[index] < 3 or time.perf_counter() < stop:
            run(batch)
            counts[index] += 1

    started = time.perf_counter()
    workers = [threading.Thread(target=work, args=(index, started + seconds)) for index in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return sum(counts) * batch.shape[0] / (time.perf_counter() - started)


def measure_raw(engine: Any, images: np.ndarray, options: BenchOptions) -> RawMeasurement:
    """Raw onnxruntime images/s per batch size (the better of one caller thread and raw_threads side by
    side, as the service's inference threads run), batch-1 latencies, and raw engine (onnxruntime +
    scoring) images/s at the best batch size, all in this process with the service's session options."""
    pool = images.astype(np.float32)
    callers = sorted({1, options.raw_threads})
    per_size_seconds = options.raw_seconds / max(len(options.raw_batch_sizes) * len(callers), 1)
    throughput: dict[int, float] = {}
    for batch_size in options.raw_batch_sizes:
        batch = np.ascontiguousarray(np.resize(pool, (batch_size, *pool.shape[1:])))
        engine.runner.run(batch)
        throughput[batch_size] = max(parallel_runs_per_second(engine, batch, threads, per_size_seconds) for threads in callers)
    best_size = max(throughput, key=throughput.__getitem__)
    single = single_image_seconds(engine, pool, options.single_image_runs)
    side_by_side: list[float] = []
    if options.side_by_side and len(engine.runner.sessions) > 1:
        with ThreadPoolExecutor(max_workers=1) as helper:
            side_by_side = single_image_seconds(engine, pool, options.single_image_runs, helper)
    scored = np.ascontiguousarray(np.resize(pool, (best_size, *pool.shape[1:])))
    engine.score(scored)
    engine_throughput = max(parallel_runs_per_second(engine, scored, threads, per_size_seconds, score=True) for threads in callers)
    return RawMeasurement(throughput, single, engine_throughput, side_by_side)


def single_image_seconds(engine: Any, pool: np.ndarray, runs: int, helper: ThreadPoolExecutor | None = None) -> list[float]:
    """Wall seconds of `runs` batch-1 ModelRunner.run calls (models side by side with `helper`)."""
    seconds: list[float] = []
    for index in range(runs):
        image = pool[index % len(pool)][None]
        started = time.perf_counter()
        engine.runner.run(image, helper)
        seconds.append(time.perf_counter() - started)
    return seconds


def single_image_row(section: str, seconds: Sequence[float], detail: str, limit: float) -> BenchRow:
    """A raw batch-1 latency row: images/s from the median, p50/p99, ratio to the limit."""
    rate = 1.0 / float(np.median(seconds))
    return BenchRow(
        section,
        "-",
        1,
        f"{len(seconds)} runs of batch 1{detail}",
        rate,
        percentile_ms(seconds, 50),
        percentile_ms(seconds, 99),
        rate / limit,
    )


def raw_rows(raw: RawMeasurement, options: BenchOptions) -> list[BenchRow]:
    """The raw rows: the limit (best batch size), batch-1 latency (also side by side when measured), raw engine."""
    best_size = max(raw.throughput, key=raw.throughput.__getitem__)
    limit = raw.throughput[best_size]
    sizes = ", ".join(f"{size}: {value:,.0f}" for size, value in raw.throughput.items())
    side_by_side = ", slowest model in one thread, the others in a second"
    return [
        BenchRow(
            "raw onnxruntime (limit)",
            "-",
            None,
            f"best batch {best_size} of [{sizes}] img/s, 1 or {options.raw_threads} threads",
            limit,
            ratio_to_limit=1.0,
        ),
        single_image_row("raw onnxruntime 1 image", raw.single_seconds, "", limit),
        *(
            [single_image_row("raw onnxruntime 1 image, side by side", raw.single_side_by_side_seconds, side_by_side, limit)]
            if raw.single_side_by_side_seconds
            else []
        ),
        BenchRow(
            "raw engine (onnxruntime + scoring)",
            "-",
            None,
            f"batch {best_size}",
            raw.engine_throughput,
            ratio_to_limit=raw.engine_throughput / limit,
        ),
    ]


def process_cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a process and all its threads so far (Linux /proc), else None."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def onnxruntime_batch_totals(url: str, api_key: str | None) -> tuple[float, float] | None:
    """(sum, count) of the server's oodserve_batch_instances histogram (instances per onnxruntime run), or None."""
    import httpx

    headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        text = httpx.get(f"{url}/metrics", headers=headers, timeout=10).text
    except httpx.HTTPError:
        return None
    totals = {"_sum": 0.0, "_count": 0.0}
    for line in text.splitlines():
        for suffix in totals:
            if line.startswith(f"oodserve_batch_instances{suffix}"):
                totals[suffix] += float(line.rsplit(" ", 1)[1])
    return totals["_sum"], totals["_count"]


async def drive_load(
    url: str,
    bodies: list[bytes],
    content_type: str,
    concurrency: int,
    requests: int,
    server_pid: int | None = None,
    api_key: str | None = None,
) -> tuple[float, list[float], int, float | None, float]:
    """`requests` measured POSTs to url/v1/score from `concurrency` workers (oodserve.bench.http_driver).

    Returns (wall seconds, per-request latencies in seconds, count of requests without a 200, server CPU
    seconds used during them when server_pid is given and /proc exists, CPU seconds this client process
    used for them).
    """
    cpu_before = process_cpu_seconds(server_pid) if server_pid is not None else None
    client_cpu_before = time.process_time()
    started = time.perf_counter()
    outcomes = await send_requests(url, bodies, content_type, concurrency, requests, api_key)
    wall = time.perf_counter() - started
    cpu_after = process_cpu_seconds(server_pid) if server_pid is not None else None
    client_cpu = time.process_time() - client_cpu_before
    server_cpu = cpu_after - cpu_before if cpu_before is not None and cpu_after is not None else None
    return wall, outcomes.latencies, outcomes.not_ok, server_cpu, client_cpu


def measure_service(section: str, server_env: dict[str, str], images: np.ndarray, options: BenchOptions) -> list[BenchRow]:
    """Start the server with server_env, load it at every (body, concurrency) cell, stop it."""
    rows: list[BenchRow] = []
    with ServerProcess(options.bundle, server_env, options.server_log) as server:
        for body, per_request in ((body, count) for count in options.images_per_request for body in options.bodies):
            encoded, content_type = request_bodies(images, body, per_request)
            label = body if per_request == 1 else f"{body} x{per_request}"
            for concurrency in options.concurrency:
                if options.warmup_requests:
                    run_client(send_requests(server.url, encoded, content_type, concurrency, options.warmup_requests, options.api_key))
                runs_before = onnxruntime_batch_totals(server.url, options.api_key)
                wall, latencies, errors, server_cpu, client_cpu = run_client(
                    drive_load(server.url, encoded, content_type, concurrency, options.requests, server.process.pid, options.api_key)
                )
                scored_images = max(len(latencies) - errors, 0) * per_request  # refused requests score nothing
                images_per_second = scored_images / wall
                runs_after = onnxruntime_batch_totals(server.url, options.api_key)
                mean_batch = None
                if runs_before is not None and runs_after is not None and runs_after[1] > runs_before[1]:
                    mean_batch = (runs_after[0] - runs_before[0]) / (runs_after[1] - runs_before[1])
                rows.append(
                    BenchRow(
                        section,
                        label,
                        concurrency,
                        f"{len(latencies)} requests of {per_request} image{'s' if per_request > 1 else ''}",
                        images_per_second,
                        percentile_ms(latencies, 50),
                        percentile_ms(latencies, 99),
                        None,  # ratio to the limit: set once the raw limit is final
                        errors,
                        None if server_cpu is None or not scored_images else 1000.0 * server_cpu / scored_images,
                        1000.0 * client_cpu / scored_images if scored_images else None,
                        mean_batch,
                    )
                )
    return rows


def run_benchmark(options: BenchOptions) -> tuple[dict[str, Any], list[BenchRow]]:
    """Everything in one run: (context facts, table rows)."""
    import onnxruntime


    overrides: dict[str, Any] = {key.removeprefix("OODSERVE_").lower(): value for key, value in options.server_env}
    settings = Settings(bundle=options.bundle, **overrides)
    engine = Engine.load(options.bundle, RuntimeOptions.from_settings(settings))  # the session options the server will use
    raw_threads = settings.inference_threads or os.cpu_count() or 1
    options = replace(options, raw_threads=raw_threads, side_by_side=raw_threads >= 2 and settings.batch_side_by_side_max >= 1)
    images = load_bench_images(options.images, engine.manifest.input.shape, 512, options.seed)
    context = {
        "bundle": str(options.bundle),
        "model": f"{engine.name} {engine.version}",
        "models": list(engine.runner.sessions),
        "provider": engine.provider_summary,
        "onnxruntime": onnxruntime.__version__,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "images": str(options.images) if options.images else "synthetic blobs",
    }
    first = measure_raw(engine, images, options)
    base_env = dict(options.server_env)
    served = measure_service("service, dynamic batching", {**base_env, "OODSERVE_BATCHING": "true"}, images, options)
    if options.naive:
        served += measure_service("service, naive (1 run/request)", {**base_env, "OODSERVE_BATCHING": "false"}, images, options)
    rows = raw_rows(first.best_of(measure_raw(engine, images, options)), options)  # raw again after the servers
    limit = rows[0].images_per_second
    for row in served:
        row.ratio_to_limit = row.images_per_second / limit
    context["raw_sweeps"] = "best of a sweep before and one after the service measurements"
    return context, rows + served


def format_table(context: dict[str, Any], rows: Sequence[BenchRow]) -> str:
    """The single results table as aligned text, with a header naming bundle, provider and machine."""

    def number(value: float | None, digits: int) -> str:
        return "-" if value is None else f"{value:,.{digits}f}"

    header = [
        "measurement",
        "body",
        "conc.",
        "images/s",
        "p50 ms",
        "p99 ms",
        "x limit",
        "server CPU ms/img",
        "client CPU ms/img",
        "mean run batch",
        "errors",
        "detail",
    ]
    lines = [
        [
            row.section,
            row.body,
            "-" if row.concurrency is None else str(row.concurrency),
            number(row.images_per_second, 0),
            number(row.p50_ms, 3),
            number(row.p99_ms, 3),
            number(row.ratio_to_limit, 3),
            number(row.server_cpu_ms_per_image, 3),
            number(row.client_cpu_ms_per_image, 3),
            number(row.mean_run_batch, 1),
            str(row.errors),
            row.detail,
        ]
        for row in rows
    ]
    widths = [max(len(header[column]), *(len(line[column]) for line in lines)) for column in range(len(header))]
    right = {2, 3, 4, 5, 6, 7, 8, 9, 10}

    def render(cells: Sequence[str]) -> str:
        return "  ".join(
            cell.rjust(widths[index]) if index in right else cell.ljust(widths[index]) for index, cell in enumerate(cells)
        ).rstrip()

    title = (
        f"oodserve bench: {context['model']} from {context['bundle']} (models {', '.join(context['models'])}); "
        f"onnxruntime {context['onnxruntime']} on {context['provider']}, {context['cpus']} CPUs; images: {context['images']}"
    )
    return "\n".join([title, render(header), render(["-" * width for width in widths]), *(render(line) for line in lines)])


def rows_as_json(context: dict[str, Any], rows: Sequence[BenchRow]) -> bytes:
    return orjson.dumps({"context": context, "rows": [asdict(row) for row in rows]}, option=orjson.OPT_INDENT_2)
