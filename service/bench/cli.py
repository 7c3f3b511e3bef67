"""`oodserve bench`: the throughput table (`oodserve.bench.throughput`) or, with --load, the bounded load run
(`oodserve.bench.load`). Registered on the `oodserve` CLI when the benchmarks package is installed."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from oodserve.bench.load import LoadOptions, format_load_report, run_load
from oodserve.bench.throughput import BenchOptions, format_table, rows_as_json, run_benchmark
from oodserve.config import Settings


def _settings(**overrides: Any) -> Settings:
    return Settings(**{key: value for key, value in overrides.items() if value is not None})


def _integers(text: str, what: str) -> tuple[int, ...]:
    try:
        values = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError as error:
        raise typer.BadParameter(f"{what} must be comma-separated integers, got {text!r}") from error
    if not values or any(value < 1 for value in values):
        raise typer.BadParameter(f"{what} must be positive integers, got {text!r}")
    return values


def bench(
    bundle: Annotated[Path | None, typer.Option(help="Bundle directory [env OODSERVE_BUNDLE].")] = None,
    concurrency: Annotated[str, typer.Option(help="Client concurrencies, comma-separated.")] = "1,4,16,64",
    requests: Annotated[int, typer.Option(min=1, help="Measured requests per body type, images per request and concurrency.")] = 2000,
    warmup_requests: Annotated[int, typer.Option(min=0, help="Unmeasured requests before each measurement.")] = 50,
    raw_batch_sizes: Annotated[str, typer.Option(help="Batch sizes tried for the raw onnxruntime limit.")] = "1,8,32,64,128,256",
    raw_seconds: Annotated[float, typer.Option(min=0.0, help="Seconds spent on the raw batch-size sweep.")] = 3.0,
    single_image_runs: Annotated[int, typer.Option(min=1, help="Raw batch-1 runs for the single-image latency.")] = 500,
    bodies: Annotated[str, typer.Option(help="Body types to send: json, npy (comma-separated).")] = "json,npy",
    images_per_request: Annotated[str, typer.Option(help="Images per request, comma-separated (each gets its own rows).")] = "1",
    naive: Annotated[bool, typer.Option(help="Also measure the naive server (one onnxruntime run per request).")] = True,
    images: Annotated[Path | None, typer.Option(help="Images to send: an IDX file (gzip ok) or .npy; default synthetic blobs.")] = None,
    json_out: Annotated[Path | None, typer.Option(help="Also write the rows as JSON here.")] = None,
    server_log: Annotated[Path | None, typer.Option(help="Append the benchmark servers' logs here.")] = None,
    load: Annotated[bool, typer.Option("--load", help="Run the bounded load/soak test (--load-* options) instead.")] = False,
    load_requests: Annotated[int, typer.Option(min=1, help="--load: requests to send.")] = 20_000,
    load_concurrency: Annotated[int, typer.Option(min=1, help="--load: concurrent keep-alive clients.")] = 64,
    load_seconds: Annotated[float, typer.Option(min=1.0, help="--load: stop after this many seconds at the latest.")] = 900.0,
    load_instances: Annotated[int, typer.Option(min=1, help="--load: instances per request.")] = 1,
    load_body: Annotated[str, typer.Option(help="--load: json or npy request bodies.")] = "json",
    url: Annotated[str | None, typer.Option(help="--load: a running server on loopback instead of starting one.")] = None,
    server_pid: Annotated[int | None, typer.Option(help="--load with --url: the server's PID, for its memory.")] = None,
    api_key: Annotated[
        str | None, typer.Option(envvar="OODSERVE_BENCH_API_KEY", help="Bearer key to send (servers with OODSERVE_API_KEYS).")
    ] = None,
) -> None:
    """One table from one run: raw onnxruntime limit and single-image latency of the bundle, then the service over
    loopback HTTP (JSON and .npy bodies, each concurrency) with dynamic batching and naively, vs the limit.
    With --load: a fixed number of requests at one concurrency (after a warm-up of at least 4 x concurrency requests),
    with error counts, latency, throughput and the server's memory growth.

    Server settings come from OODSERVE_* variables (e.g. OODSERVE_BATCH_MAX_SIZE); only 127.0.0.1 is used.
    """
    if load:
        _bench_load(
            bundle=None if url else _settings(bundle=bundle).bundle,
            url=url,
            server_pid=server_pid,
            requests=load_requests,
            concurrency=load_concurrency,
            max_seconds=load_seconds,
            warmup_requests=max(warmup_requests, 4 * load_concurrency),  # at full concurrency, before the memory baseline
            instances_per_request=load_instances,
            body=load_body,
            images=images,
            api_key=api_key,
            server_log=server_log,
        )
        return

    chosen_bodies = tuple(part.strip() for part in bodies.split(",") if part.strip())
    if not chosen_bodies or any(body not in ("json", "npy") for body in chosen_bodies):
        raise typer.BadParameter(f"--bodies must name json and/or npy, got {bodies!r}")
    options = BenchOptions(
        bundle=_settings(bundle=bundle).bundle,
        concurrency=_integers(concurrency, "--concurrency"),
        requests=requests,
        warmup_requests=warmup_requests,
        raw_batch_sizes=_integers(raw_batch_sizes, "--raw-batch-sizes"),
        raw_seconds=raw_seconds,
        single_image_runs=single_image_runs,
        bodies=chosen_bodies,
        images_per_request=_integers(images_per_request, "--images-per-request"),
        naive=naive,
        images=images,
        server_log=server_log,
        api_key=api_key,
    )
    context, rows = run_benchmark(options)
    typer.echo(format_table(context, rows))
    if json_out is not None:
        json_out.write_bytes(rows_as_json(context, rows))


def _bench_load(**options: Any) -> None:
    """`bench --load`: run oodserve.bench.load, print its report; exit 1 when any request failed (503 aside)."""

    if options["body"] not in ("json", "npy"):
        raise typer.BadParameter(f"--load-body must be json or npy, got {options['body']!r}")
    try:
        report = run_load(LoadOptions(**options))
    except ValueError as error:
        typer.echo(f"oodserve: {error}", err=True)
        raise typer.Exit(code=2) from error
    typer.echo(format_load_report(report))
    if report.errors:
        raise typer.Exit(code=1)




def register(app: typer.Typer) -> None:
    """Attach `bench` to the main CLI."""
    app.command()(bench)
