"""oodserve beside MLServer on the same bundle, same machine, same run: `python -m oodserve.bench.peers.compare [--quick]`.

What one run does, in this order:
1. the raw onnxruntime limit: the bundle's models on batches of 64 from 2 threads in this process, with
   oodserve's session options (one intra-op thread per session); measured before the servers start and
   after they stop, the better figure counts (noise only slows a run down);
2. starts oodserve (`python -m oodserve.cli serve`, gRPC on) and MLServer from its own venv
   (service/bench/peers/mlserver: a custom runtime running the same ONNX files with onnxruntime, adaptive
   batching max_batch_size 64 / max_batch_time 0.004 s) once per parallel_workers setting (default 1, which
   is MLServer 1.7.1's default, 0 = inference in the server process, and 2 = one worker per core), all on
   free 127.0.0.1 ports; checks that MLServer's outputs are onnxruntime's; warms each one up;
3. the rows, each a fixed number of requests (--requests) after a warm-up at the same concurrency:
   v2 JSON with 1 image per request at c=1, 16, 64 and with 8 images per request at c=16 on every server,
   alternating which server goes first from row to row; then oodserve's .npy and gRPC rows (1 image per
   request, c=16 and c=64).
MLServer's "best setting" is per row: the parallel_workers setting with the most images/s in that row of
this run (marked *), so no single choice made elsewhere decides the peer's figure.
Per row: images/s, p50/p99 request latency, the server's CPU ms per image (utime+stime of the server and
its child processes from /proc, MLServer's workers included), this client's CPU ms per image, and the
ratio to the raw limit. The load client runs in this process on the same cores as the servers.

The two servers do not answer the same thing: oodserve returns the scored verdict (p-values, fused score,
class), MLServer's runtime the raw output tensors of the three models (oodserve's scoring is not in it).
MLServer's max_batch_size counts requests, oodserve's OODSERVE_BATCH_MAX_SIZE images. Requests carry
`Accept-Encoding: identity` so MLServer does not gzip its answers (oodserve never does).

A full run writes benchmarks/results/peers-mlserver.json and .txt; --quick writes to /tmp.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from oodserve.bench.http_driver import Outcomes, ServerProcess, free_port, request_bodies, run_client, send_requests
from oodserve.bench.load import require_loopback
from oodserve.bench.peers.drivers import grpc_infer_requests, process_tree_cpu_seconds, send_grpc, send_prepared, v2_json_bodies
from oodserve.bench.peers.mlserver.launch import DEFAULT_VENV, MLServerProcess, mlserver_versions
from oodserve.bench.throughput import parallel_runs_per_second, percentile_ms
from oodserve.config import Settings
from oodserve.datasets import DEFAULT_FASHION_MNIST_DIR
from oodserve.datasets import load_images as read_set
from oodserve.engine import Engine
from oodserve.runtime.sessions import RuntimeOptions

REPO = Path(__file__).resolve().parents[3]
DEFAULT_BUNDLE = REPO / "models" / "bundles" / "fashion-mnist"
RESULTS = REPO / "benchmarks" / "results"
QUICK_OUTPUT = Path("/tmp/peers-mlserver-quick")
V2_ROWS = ((1, 1), (1, 16), (1, 64), (8, 16))
"""(images per request, concurrency) of the v2 JSON rows every server gets."""
OODSERVE_ONLY_ROWS = (("npy", 1, 16), ("npy", 1, 64), ("gRPC", 1, 16), ("gRPC", 1, 64))
RAW_BATCH = 64
V2_HEADERS = {"content-type": "application/json", "accept-encoding": "identity"}
DEFAULT_WORKER_SETTING = 1
"""MLServer 1.7.1's default parallel_workers: one inference worker process beside the server process."""


@dataclass(frozen=True)
class CompareOptions:
    """What one comparison run measures and where it writes."""

    bundle: Path = DEFAULT_BUNDLE
    images: Path | None = None
    requests: int = 4000
    warmup_requests: int = 200
    raw_seconds: float = 4.0
    raw_threads: int = 2
    max_seconds_per_row: float = 300.0
    mlserver_venv: Path = DEFAULT_VENV
    mlserver_workers: tuple[int, ...] = (1, 0, 2)
    distinct_bodies: int = 256
    output: Path | None = RESULTS / "peers-mlserver"
    server_log: Path | None = None
    single_image_runs: int = 2000
    """ModelRunner.run calls for the raw single-image latency (the c=1 row's reference)."""


@dataclass
class PeerRow:
    """One line of the table; None where a column does not apply."""

    server: str
    protocol: str
    images_per_request: int | None
    concurrency: int | None
    images_per_second: float
    server_cpu_ms_per_image: float | None = None
    ratio_to_limit: float | None = None
    p50_ms: float | None = None
    p99_ms: float | None = None
    client_cpu_ms_per_image: float | None = None
    requests: int = 0
    errors: int = 0
    order: int | None = None
    """Position of this server within its row (1 = measured first)."""
    stopped_at_time_bound: bool = False
    best_peer_setting: bool = False
    """The MLServer setting with the most images/s in this row (MLServer rows only)."""


@dataclass(frozen=True)
class Target:
    """One running server as the rows see it."""

    label: str
    pid: int
    base_url: str
    model: str
    grpc_target: str | None = None


Sender = Callable[[int, int, float | None], Coroutine[Any, Any, Outcomes]]
"""(concurrency, requests, max seconds) -> outcomes of that many requests of one row's kind."""


def worker_label(workers: int) -> str:
    if workers == DEFAULT_WORKER_SETTING:
        return f"MLServer default ({workers} worker)"
    if workers == 0:
        return "MLServer in-process (0 workers)"
    return f"MLServer {workers} workers"


def worker_meaning(workers: int) -> str:
    """What a parallel_workers setting means for where MLServer runs inference."""
    if workers == 0:
        return "parallel_workers=0: inference in the server process, on its event loop"
    default = " (MLServer 1.7.1's default)" if workers == DEFAULT_WORKER_SETTING else ""
    return f"parallel_workers={workers}{default}: {workers} inference worker process(es) beside the HTTP server process"


def load_images(options: CompareOptions, shape: Sequence[int], count: int) -> np.ndarray:
    """The first `count` Fashion-MNIST test images (or of options.images) as (count, *shape) uint8."""

    images = read_set(options.images or DEFAULT_FASHION_MNIST_DIR, "test").images
    chosen = np.resize(images, (count, *images.shape[1:])) if len(images) < count else images[:count]
    return np.ascontiguousarray(chosen.reshape((count, *shape)), dtype=np.uint8)


def raw_limit(engine: Any, images: np.ndarray, options: CompareOptions) -> float:
    """Images/s of ModelRunner.run on batches of RAW_BATCH from options.raw_threads threads."""
    batch = np.ascontiguousarray(np.resize(images, (RAW_BATCH, *images.shape[1:])), dtype=np.float32)
    engine.runner.run(batch)
    return parallel_runs_per_second(engine, batch, options.raw_threads, options.raw_seconds)


def raw_single_image_latency(engine: Any, images: np.ndarray, runs: int) -> PeerRow:
    """p50/p99 of ModelRunner.run on one image at a time the way the service runs a lone request: the bundle's models
    side by side in the calling thread and one helper thread (OODSERVE_BATCH_SIDE_BY_SIDE_MAX), no scoring, no HTTP."""
    from concurrent.futures import ThreadPoolExecutor

    singles = np.ascontiguousarray(images, dtype=np.float32)
    latencies = []
    with ThreadPoolExecutor(max_workers=1) as helper:
        for index in range(runs + runs // 10):
            image = singles[index % len(singles)][None]
            started = time.perf_counter()
            engine.runner.run(image, helper)
            if index >= runs // 10:  # the first tenth warms up
                latencies.append(time.perf_counter() - started)
    return PeerRow(
        "raw onnxruntime (1 image, side by side)",
        "-",
        1,
        1,
        len(latencies) / sum(latencies),
        p50_ms=percentile_ms(latencies, 50),
        p99_ms=percentile_ms(latencies, 99),
    )


def check_mlserver_outputs(target: Target, engine: Any, images: np.ndarray) -> float:
    """Largest relative difference between MLServer's answer for 8 images and onnxruntime's outputs here;
    raises when an output is missing or differs beyond float32 noise (then the rows would compare other work)."""
    import httpx

    group = images[:8]
    url = f"{target.base_url}/v2/models/{target.model}/infer"
    response = httpx.post(url, content=v2_json_bodies(group, 8)[0], headers=V2_HEADERS, timeout=60)
    response.raise_for_status()
    answered = {output["name"]: np.asarray(output["data"], dtype=np.float64) for output in response.json()["outputs"]}
    expected = engine.runner.run(group.astype(np.float32))
    worst = 0.0
    for model, outputs in expected.items():
        for name, array in outputs.items():
            got = answered.get(f"{model}.{name}")
            if got is None or got.size != array.size:
                raise RuntimeError(f"MLServer's answer lacks {model}.{name} of {array.size} values")
            scale = max(float(np.abs(array).max()), 1e-6)
            worst = max(worst, float(np.abs(got - array.reshape(-1).astype(np.float64)).max()) / scale)
    if worst > 1e-4:
        raise RuntimeError(f"MLServer's outputs differ from onnxruntime's by {worst:.2e} (relative): not the same computation")
    return worst


def measure(target: Target, protocol: str, per_request: int, concurrency: int, send: Sender, options: CompareOptions) -> PeerRow:
    """Warm up at the row's concurrency, then options.requests measured requests; CPU of the server's process tree."""
    if options.warmup_requests:
        run_client(send(concurrency, options.warmup_requests, options.max_seconds_per_row))
    cpu_before = process_tree_cpu_seconds(target.pid)
    client_before = time.process_time()
    started = time.perf_counter()
    outcomes = run_client(send(concurrency, options.requests, options.max_seconds_per_row))
    wall = time.perf_counter() - started
    client_cpu = time.process_time() - client_before
    cpu_after = process_tree_cpu_seconds(target.pid)
    ok = outcomes.statuses.get(200, 0)
    images = ok * per_request
    server_cpu = None if cpu_before is None or cpu_after is None or not images else 1000.0 * (cpu_after - cpu_before) / images
    return PeerRow(
        server=target.label,
        protocol=protocol,
        images_per_request=per_request,
        concurrency=concurrency,
        images_per_second=images / wall if wall > 0 else 0.0,
        server_cpu_ms_per_image=server_cpu,
        p50_ms=percentile_ms(outcomes.latencies, 50) if outcomes.latencies else None,
        p99_ms=percentile_ms(outcomes.latencies, 99) if outcomes.latencies else None,
        client_cpu_ms_per_image=1000.0 * client_cpu / images if images else None,
        requests=len(outcomes.latencies) + sum(outcomes.transport_errors.values()),
        errors=outcomes.not_ok,
        stopped_at_time_bound=outcomes.stopped_at_time_bound,
    )


def v2_sender(target: Target, bodies: list[bytes]) -> Sender:
    url = f"{target.base_url}/v2/models/{target.model}/infer"
    require_loopback(url)
    return lambda concurrency, requests, seconds: send_prepared(url, bodies, V2_HEADERS, concurrency, requests, seconds)


def npy_sender(target: Target, bodies: list[bytes]) -> Sender:
    require_loopback(target.base_url)
    return lambda concurrency, requests, seconds: send_requests(
        target.base_url, bodies, "application/x-npy", concurrency, requests, max_seconds=seconds
    )


def grpc_sender(target: Target, messages: list[Any]) -> Sender:
    assert target.grpc_target is not None
    require_loopback(f"http://{target.grpc_target}")
    return lambda concurrency, requests, seconds: send_grpc(target.grpc_target or "", messages, concurrency, requests, seconds)


def run_rows(
    oodserve: Target, peers: list[Target], images: np.ndarray, options: CompareOptions, say: Callable[[str], None]
) -> list[PeerRow]:
    """Every row: the v2 JSON rows on all servers (order alternating per row), then oodserve's .npy and gRPC rows."""
    rows: list[PeerRow] = []
    servers = [oodserve, *peers]
    for index, (per_request, concurrency) in enumerate(V2_ROWS):
        bodies = v2_json_bodies(images[: options.distinct_bodies * per_request], per_request)
        order = servers if index % 2 == 0 else servers[::-1]
        for position, target in enumerate(order, start=1):
            say(f"  v2 JSON x{per_request} c={concurrency}: {target.label}")
            row = measure(target, "v2 JSON", per_request, concurrency, v2_sender(target, bodies), options)
            row.order = position
            rows.append(row)
    for protocol, per_request, concurrency in OODSERVE_ONLY_ROWS:
        chosen = images[: options.distinct_bodies * per_request]
        if protocol == "npy":
            sender = npy_sender(oodserve, request_bodies(chosen, "npy", per_request)[0])
        else:
            sender = grpc_sender(oodserve, grpc_infer_requests(chosen, per_request, oodserve.model))
        say(f"  {protocol} x{per_request} c={concurrency}: {oodserve.label}")
        rows.append(measure(oodserve, protocol, per_request, concurrency, sender, options))
    mark_best_peer_settings(rows, {target.label for target in peers})
    return rows


def mark_best_peer_settings(rows: Sequence[PeerRow], peer_labels: set[str]) -> None:
    """Flag, in every row, the MLServer setting that got the most images/s: "best setting" is per row, from this run."""
    cells: dict[tuple[str, int | None, int | None], list[PeerRow]] = {}
    for row in rows:
        if row.server in peer_labels:
            cells.setdefault((row.protocol, row.images_per_request, row.concurrency), []).append(row)
    for candidates in cells.values():
        max(candidates, key=lambda row: row.images_per_second).best_peer_setting = True


def run_comparison(options: CompareOptions, say: Callable[[str], None] = print) -> tuple[dict[str, Any], list[PeerRow]]:
    """Everything in one run: (context facts, table rows)."""
    from contextlib import ExitStack

    import onnxruntime


    engine = Engine.load(options.bundle, RuntimeOptions.from_settings(Settings(bundle=options.bundle)))
    shape = list(engine.manifest.input.shape)
    images = load_images(options, shape, options.distinct_bodies * max(per_request for per_request, _ in V2_ROWS))
    say(f"raw onnxruntime, batch {RAW_BATCH}, {options.raw_threads} threads ...")
    first_limit = raw_limit(engine, images, options)
    peers_versions = mlserver_versions(options.mlserver_venv)
    context: dict[str, Any] = {
        "bundle": str(options.bundle.relative_to(REPO) if options.bundle.is_relative_to(REPO) else options.bundle),
        "model": f"{engine.name} {engine.version}",
        "models": list(engine.runner.sessions),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "onnxruntime": onnxruntime.__version__,
        "mlserver_venv": peers_versions,
        "images": f"Fashion-MNIST test set, first {len(images)} images, {options.distinct_bodies} distinct bodies per row",
        "requests_per_row": options.requests,
        "warmup_requests_per_row": options.warmup_requests,
        "raw_limit": f"ModelRunner.run on batch {RAW_BATCH} from {options.raw_threads} threads, oodserve's session options "
        f"(intra-op 1), {options.raw_seconds:g} s, best of one sweep before and one after the servers",
        "oodserve": "python -m oodserve.cli serve, default settings (lean routes, dynamic batching, batch_max_size 64 images, "
        "batch_max_delay_ms 0, batch_min_beside_run 8, one inference thread per core), gRPC on OODSERVE_GRPC_PORT",
        "mlserver": "service/bench/peers/mlserver: runtime.BundleOnnxRuntime (onnxruntime, intra-op 1, every output tensor raw), "
        "adaptive batching max_batch_size 64 requests, max_batch_time 0.004 s, debug off, uvloop + httptools",
        "mlserver_worker_settings": {worker_label(workers): worker_meaning(workers) for workers in options.mlserver_workers},
        "order": "v2 JSON rows alternate which server goes first (order column); each cell warms up at its own concurrency",
        "client": "this process: aiohttp on uvloop, one keep-alive connection per concurrent client, prebuilt bodies, "
        "Accept-Encoding: identity; gRPC: grpc.aio, one channel, prebuilt ModelInferRequest (raw_input_contents)",
        "answers": "oodserve: scored verdict tensors; MLServer: raw outputs of the three models (11 tensors, 83 floats/image)",
    }
    log = options.server_log
    with ExitStack() as stack:
        grpc_port = free_port()
        say("starting oodserve ...")
        served = stack.enter_context(ServerProcess(options.bundle, {"OODSERVE_GRPC_PORT": str(grpc_port)}, log))
        oodserve = Target("oodserve", served.process.pid, served.url, engine.name, f"127.0.0.1:{grpc_port}")
        peers = []
        for workers in options.mlserver_workers:
            say(f"starting MLServer, parallel_workers={workers} ...")
            peer = stack.enter_context(MLServerProcess(options.mlserver_venv, options.bundle, workers, log))
            peers.append(Target(worker_label(workers), peer.process.pid, peer.url, peer.model))
        context["mlserver_output_check"] = {
            target.label: f"max relative difference to onnxruntime {check_mlserver_outputs(target, engine, images):.1e}" for target in peers
        }
        warm_bodies = v2_json_bodies(images, 1)
        for target in [oodserve, *peers]:  # a first warm-up per server before any row (arenas, batchers, workers)
            run_client(v2_sender(target, warm_bodies)(16, max(options.warmup_requests, 64), options.max_seconds_per_row))
        say("rows:")
        rows = run_rows(oodserve, peers, images, options, say)
    say("raw onnxruntime again ...")
    limit = max(first_limit, raw_limit(engine, images, options))
    raw = PeerRow("raw onnxruntime (limit)", "-", RAW_BATCH, None, limit, ratio_to_limit=1.0)
    single = raw_single_image_latency(engine, images, options.single_image_runs)
    for row in [single, *rows]:
        row.ratio_to_limit = row.images_per_second / limit
    lone = next(row for row in rows if row.server == "oodserve" and row.protocol == "v2 JSON" and row.concurrency == 1)
    if lone.p50_ms is not None and single.p50_ms is not None:
        context["c1_p50_above_raw_single_image_ms"] = round(lone.p50_ms - single.p50_ms, 2)
    return context, [raw, single, *rows]


def format_table(context: dict[str, Any], rows: Sequence[PeerRow]) -> str:
    """The rows as aligned text under a title naming bundle, versions and machine."""

    def number(value: float | None, digits: int) -> str:
        return "-" if value is None else f"{value:,.{digits}f}"

    header = ["server", "protocol", "img/req", "conc.", "images/s", "server CPU ms/img", "x raw limit", "p50 ms", "p99 ms",
              "client CPU ms/img", "errors", "order"]
    lines = [
        [
            row.server + (" *" if row.best_peer_setting else ""),
            row.protocol,
            "-" if row.images_per_request is None else str(row.images_per_request),
            "-" if row.concurrency is None else str(row.concurrency),
            number(row.images_per_second, 0),
            number(row.server_cpu_ms_per_image, 3),
            number(row.ratio_to_limit, 3),
            number(row.p50_ms, 2),
            number(row.p99_ms, 2),
            number(row.client_cpu_ms_per_image, 3),
            str(row.errors) + (" (time bound)" if row.stopped_at_time_bound else ""),
            "-" if row.order is None else str(row.order),
        ]
        for row in rows
    ]
    widths = [max(len(header[column]), *(len(line[column]) for line in lines)) for column in range(len(header))]

    def render(cells: Sequence[str]) -> str:
        return "  ".join(cell.ljust(widths[i]) if i < 2 else cell.rjust(widths[i]) for i, cell in enumerate(cells)).rstrip()

    versions = context["mlserver_venv"]
    title = (
        f"oodserve vs MLServer {versions['mlserver']}: {context['model']} ({', '.join(context['models'])}); onnxruntime "
        f"{context['onnxruntime']} (MLServer venv {versions['onnxruntime']}), {context['cpus']} CPUs, client on the same machine; "
        f"{context['requests_per_row']} requests per row after {context['warmup_requests_per_row']} warm-up"
    )
    notes = [f"  {label}: {meaning}" for label, meaning in context["mlserver_worker_settings"].items()]
    notes.append("  * = MLServer's best setting in that row (most images/s of the settings above, this run)")
    if "c1_p50_above_raw_single_image_ms" in context:
        notes.append(f"  oodserve c=1 p50 minus the raw single-image p50: {context['c1_p50_above_raw_single_image_ms']:.2f} ms")
    return "\n".join([title, *notes, render(header), render(["-" * width for width in widths]), *(render(line) for line in lines)])


def write_results(prefix: Path, context: dict[str, Any], rows: Sequence[PeerRow], table: str) -> None:
    prefix.parent.mkdir(parents=True, exist_ok=True)
    prefix.with_suffix(".json").write_bytes(
        orjson.dumps({"context": context, "rows": [asdict(row) for row in rows]}, option=orjson.OPT_INDENT_2) + b"\n"
    )
    prefix.with_suffix(".txt").write_text(table + "\n")


def parse_options(argv: Sequence[str] | None = None) -> CompareOptions:
    parser = argparse.ArgumentParser(prog="python -m oodserve.bench.peers.compare", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 300 requests per row, short warm-ups, results to /tmp")
    parser.add_argument("--requests", type=int, help="measured requests per row (default 4000; 300 with --quick)")
    parser.add_argument("--warmup-requests", type=int, help="unmeasured requests before each row (default 200; 32 with --quick)")
    parser.add_argument("--raw-seconds", type=float, help="seconds per raw onnxruntime measurement (default 4; 1 with --quick)")
    parser.add_argument("--max-seconds-per-row", type=float, default=300.0, help="stop a row after this long at the latest")
    parser.add_argument("--bundle", type=Path, default=DEFAULT_BUNDLE)
    parser.add_argument("--images", type=Path, help="images to send (default: the Fashion-MNIST test set)")
    parser.add_argument("--mlserver-venv", type=Path, default=DEFAULT_VENV, help="MLServer's venv (install.sh)")
    parser.add_argument(
        "--mlserver-workers",
        default="1,0,2",
        help="MLServer parallel_workers settings to run, comma-separated (1 = MLServer's default, 0 = in-process)",
    )
    parser.add_argument("--output", type=Path, help="write PREFIX.json and PREFIX.txt (default benchmarks/results/peers-mlserver; "
                        "/tmp/peers-mlserver-quick with --quick)")
    parser.add_argument("--server-log", type=Path, help="append both servers' logs here")
    args = parser.parse_args(argv)
    workers = tuple(dict.fromkeys(int(part) for part in args.mlserver_workers.split(",") if part.strip()))
    if any(count < 0 for count in workers):
        parser.error("--mlserver-workers must be non-negative integers")
    quick = args.quick
    return CompareOptions(
        bundle=args.bundle.resolve(),
        images=args.images,
        requests=args.requests or (300 if quick else 4000),
        warmup_requests=args.warmup_requests if args.warmup_requests is not None else (32 if quick else 200),
        raw_seconds=args.raw_seconds or (1.0 if quick else 4.0),
        max_seconds_per_row=args.max_seconds_per_row,
        mlserver_venv=args.mlserver_venv,
        mlserver_workers=workers,
        output=args.output or (QUICK_OUTPUT if quick else RESULTS / "peers-mlserver"),
        server_log=args.server_log,
        single_image_runs=300 if quick else 2000,
    )


def main(argv: Sequence[str] | None = None) -> int:
    options = parse_options(argv)
    started = time.monotonic()
    context, rows = run_comparison(options, say=lambda line: print(line, file=sys.stderr, flush=True))
    context["wall_seconds"] = round(time.monotonic() - started, 1)
    table = format_table(context, rows)
    print(table)
    if options.output is not None:
        write_results(options.output, context, rows, table)
        print(f"wrote {options.output.with_suffix('.json')} and .txt", file=sys.stderr)
    return 1 if any(row.errors for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
