"""The `oodserve` command line: `serve`, `info` and `export-triton` here; the training commands (train extra)
and `bench` (dev extra) are registered by `oodserve.cli.optional` when their packages are installed."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from oodserve import __version__
from oodserve.bundle.loader import BundleError
from oodserve.cli.optional import register_optional_commands
from oodserve.config import Settings
from oodserve.dataplane import describe_model
from oodserve.engine import Engine
from oodserve.export.triton import TritonExportError, export_triton_repository
from oodserve.runtime.providers import GpuRequiredError, available_providers
from oodserve.runtime.sessions import RuntimeOptions
from oodserve.server.app import create_app, load_registry_from_settings
from oodserve.server.runner import run_server

app = typer.Typer(
    help="oodserve: out-of-distribution detection service for ONNX model bundles.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


def _settings(**overrides: Any) -> Any:
    """Settings from OODSERVE_* variables, with the command-line options that were given taking priority."""

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
    grpc_port: Annotated[int | None, typer.Option(help="Also serve KServe v2 gRPC on this port [env OODSERVE_GRPC_PORT; off].")] = None,
) -> None:
    """Verify the bundle(s), then serve the HTTP API (and gRPC with --grpc-port; ready after warm-up)."""

    settings = _settings(bundle=bundle, host=host, port=port, log_level=log_level, grpc_port=grpc_port)
    _configure_logging(settings.log_level)

    try:
        registry = load_registry_from_settings(settings)
    except (BundleError, GpuRequiredError) as error:
        typer.echo(f"oodserve: refusing to start: {error}", err=True)
        raise typer.Exit(code=2) from error

    run_server(create_app(settings, registry), settings)  # SIGTERM: finish in-flight requests, exit 0; SIGHUP: reload


@app.command()
def info(
    bundle: Annotated[Path | None, typer.Option(help="Bundle directory [env OODSERVE_BUNDLE].")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the full model summary as JSON.")] = False,
) -> None:
    """Verify a bundle, create its sessions and print its summary and the execution providers."""

    settings = _settings(bundle=bundle)
    try:
        engine = Engine.load(settings.bundle, RuntimeOptions.from_settings(settings))
    except (BundleError, GpuRequiredError) as error:
        typer.echo(f"oodserve: {error}", err=True)
        raise typer.Exit(code=2) from error
    summary = describe_model(engine).model_dump()
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
        typer.echo(
            f"signal     {signal['name']} ({signal['kind']} of {signal['model']}.{signal['output']}), n={signal['calibration_size']}"
        )
    fusion = summary["fusion"]
    typer.echo(f"fusion     {fusion['method']} of {fusion['signals']} (n={fusion['calibration_size']}): {fusion['reason']}")
    typer.echo(f"alpha      {summary['default_alpha']}")
    typer.echo(f"providers  available {available_providers()}")


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


register_optional_commands(app)
