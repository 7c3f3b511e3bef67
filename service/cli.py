"""The `oodserve` command line: `serve` and `info` here; torch-side commands are added when installed."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from service import __version__

app = typer.Typer(
    help="oodserve: out-of-distribution detection service for ONNX model bundles.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


def _settings(**overrides: Any) -> Any:
    """Settings from OODSERVE_* variables, with the command-line options that were given taking priority."""
    from service.config import Settings

    return Settings(**{key: value for key, value in overrides.items() if value is not None})


def _configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr, force=True
    )


@app.command()
def serve(
    bundle: Annotated[Path | None, typer.Option(help="Bundle directory (default model) [env OODSERVE_BUNDLE].")] = None,
    host: Annotated[str | None, typer.Option(help="Bind address [env OODSERVE_HOST, default 127.0.0.1].")] = None,
    port: Annotated[int | None, typer.Option(help="Port [env OODSERVE_PORT, default 8000].")] = None,
    log_level: Annotated[str | None, typer.Option(help="debug, info, warning or error [env OODSERVE_LOG_LEVEL].")] = None,
) -> None:
    """Verify the bundle(s), then serve the HTTP API (ready after warm-up)."""
    from service.bundle.loader import BundleError
    from service.runtime.providers import GpuRequiredError

    settings = _settings(bundle=bundle, host=host, port=port, log_level=log_level)
    _configure_logging(settings.log_level)
    from service.app import create_app, load_registry_from_settings

    try:
        registry = load_registry_from_settings(settings)
    except (BundleError, GpuRequiredError) as error:
        typer.echo(f"oodserve: refusing to start: {error}", err=True)
        raise typer.Exit(code=2) from error
    from service.serving import run_server

    run_server(create_app(settings, registry), settings)  # SIGTERM: finish in-flight requests, exit 0; SIGHUP: reload


@app.command()
def info(
    bundle: Annotated[Path | None, typer.Option(help="Bundle directory [env OODSERVE_BUNDLE].")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the full model summary as JSON.")] = False,
) -> None:
    """Verify a bundle, create its sessions and print its summary and the execution providers."""
    from service.app import runtime_options
    from service.bundle.loader import BundleError
    from service.engine import Engine
    from service.runtime.providers import GpuRequiredError, available_providers

    settings = _settings(bundle=bundle)
    try:
        engine = Engine.load(settings.bundle, runtime_options(settings))
    except (BundleError, GpuRequiredError) as error:
        typer.echo(f"oodserve: {error}", err=True)
        raise typer.Exit(code=2) from error
    summary = engine.describe()
    if as_json:
        typer.echo(json.dumps({"oodserve_version": __version__, "available_providers": available_providers(), **summary}, indent=2))
        return
    typer.echo(f"bundle     {settings.bundle} (all {len(engine.manifest.files)} files match their sha256)")
    typer.echo(f"model      {summary['name']} {summary['version']}: {summary['description']}")
    spec = summary["input"]
    typer.echo(f"input      shape {spec['shape']} {spec['dtype']} in [{spec['min']:g}, {spec['max']:g}] {spec['layout']}")
    typer.echo(f"labels     {summary['labels']}")
    for name, model in summary["models"].items():
        typer.echo(f"onnx       {name}: {model['file']} outputs {model['outputs']} on {model['provider']}")
    for signal in summary["signals"]:
        typer.echo(f"signal     {signal['name']} ({signal['kind']} of {signal['model']}.{signal['output']}), n={signal['calibration_size']}")
    fusion = summary["fusion"]
    typer.echo(f"fusion     {fusion['method']} of {fusion['signals']} (n={fusion['calibration_size']}): {fusion['reason']}")
    typer.echo(f"alpha      {summary['default_alpha']}")
    typer.echo(f"providers  available {available_providers()}")


def _integers(text: str, what: str) -> tuple[int, ...]:
    try:
        values = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError as error:
        raise typer.BadParameter(f"{what} must be comma-separated integers, got {text!r}") from error
    if not values or any(value < 1 for value in values):
        raise typer.BadParameter(f"{what} must be positive integers, got {text!r}")
    return values


@app.command()
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
    api_key: Annotated[str | None, typer.Option(envvar="OODSERVE_BENCH_API_KEY", help="Bearer key to send (servers with OODSERVE_API_KEYS).")] = None,
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
    from service.benchmark import BenchOptions, format_table, run_benchmark, rows_as_json

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
    """`bench --load`: run service.loadtest, print its report; exit 1 when any request failed (503 aside)."""
    from service.loadtest import LoadOptions, format_load_report, run_load

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


@app.command("export-triton")
def export_triton(
    bundle: Annotated[Path, typer.Option(help="Bundle directory to export (verified first).")],
    out: Annotated[Path, typer.Option(help="Output directory: model_repository/, bundle/ and triton_models.json go here.")],
    max_batch_size: Annotated[int, typer.Option(min=1, help="Triton max_batch_size of every model.")] = 256,
    max_queue_delay_us: Annotated[int, typer.Option(min=0, help="Dynamic batching: longest wait for a fuller batch, microseconds.")] = 2000,
    instance_kind: Annotated[str, typer.Option(help="auto, gpu or cpu: where Triton places the model instances.")] = "auto",
    instance_count: Annotated[int, typer.Option(min=1, help="Model instances per device.")] = 1,
    name_prefix: Annotated[str | None, typer.Option(help="Prefix of the Triton model names [default: '<bundle name>-'].")] = None,
) -> None:
    """Write a Triton model repository (config.pbtxt with dynamic batching per ONNX model) plus a bundle copy for scoring."""
    from service.bundle.loader import BundleError
    from service.triton import TritonExportError, export_triton_repository

    try:
        export = export_triton_repository(
            bundle, out, max_batch_size, max_queue_delay_us, instance_kind, instance_count, name_prefix
        )
    except (BundleError, TritonExportError) as error:
        typer.echo(f"oodserve: {error}", err=True)
        raise typer.Exit(code=2) from error
    for model_name, triton_name in export.model_names.items():
        typer.echo(f"triton     {model_name} -> {export.repository / triton_name}")
    typer.echo(f"bundle     {export.bundle} (scoring side: signals, p-values and fusion stay in oodserve)")
    typer.echo(f"serve with tritonserver --model-repository {export.repository}")


try:
    from models.cli import register

    register(app)
except ImportError:
    pass


if __name__ == "__main__":
    app()
