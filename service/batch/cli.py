"""`oodserve score INPUT --bundle DIR --out OUT.parquet`: registered by `oodserve.cli.optional` when the `batch`
extra (ray, pyarrow) is installed."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from oodserve.batch.run import BadRowError, BatchOptions, Progress, score_file
from oodserve.batch.sources import SourceError
from oodserve.bundle.loader import BundleError
from oodserve.config import Settings
from oodserve.runtime.providers import GpuRequiredError
from oodserve.scoring.inputs import InputError


def score(
    input_path: Annotated[Path, typer.Argument(metavar="INPUT", help="Parquet/CSV file or folder, .npy file, or image folder.")],
    bundle: Annotated[Path, typer.Option(help="Bundle directory.")],
    out: Annotated[Path, typer.Option(help="Output Parquet file (one row per input row, in stored order).")],
    alpha: Annotated[float | None, typer.Option(help="Significance level (default: the bundle's default_alpha).")] = None,
    actors: Annotated[int, typer.Option(min=1, help="Scoring actors, each with its own Engine.")] = 1,
    batch_size: Annotated[int, typer.Option(min=1, help="Rows per scoring call.")] = 4096,
    threads: Annotated[int, typer.Option(min=0, help="onnxruntime threads per actor (0: cores / actors).")] = 0,
    gpus_per_actor: Annotated[float | None, typer.Option(help="GPUs per actor (default: 1 when onnxruntime has CUDA, else 0).")] = None,
    address: Annotated[str | None, typer.Option(help="Join this Ray cluster (`auto`, `ray://host:10001`); default: a local Ray.")] = None,
    object_store_mb: Annotated[int, typer.Option(min=80, help="Object store of the local Ray, MiB (bounds the blocks in flight).")] = 256,
    on_bad_row: Annotated[str, typer.Option(help="skip: report bad rows (`error` column), score the rest; fail: stop.")] = "skip",
    drift: Annotated[bool, typer.Option("--drift", help="Run the server's drift tests over the rows in stored order.")] = False,
    id_column: Annotated[str | None, typer.Option(help="Column carried to the output as `id` (default: a column `id`).")] = None,
    image_column: Annotated[str | None, typer.Option(help="Parquet column of PNG/JPEG bytes (image bundles).")] = None,
    allow_extra_columns: Annotated[bool, typer.Option("--allow-extra-columns", help="Ignore columns the bundle does not read.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
    progress: Annotated[bool, typer.Option(help="Show progress on stderr.")] = True,
) -> None:
    """Score a whole table or image store on Ray Data with the server's verdicts; print a summary."""
    if on_bad_row not in ("skip", "fail"):
        raise typer.BadParameter(f"must be skip or fail, got {on_bad_row!r}", param_hint="--on-bad-row")
    options = BatchOptions(alpha=alpha, actors=actors, batch_size=batch_size, threads=threads, gpus_per_actor=gpus_per_actor,
                           address=address, object_store_mb=object_store_mb, on_bad_row="fail" if on_bad_row == "fail" else "skip",
                           drift=drift, id_column=id_column, image_column=image_column, allow_extra_columns=allow_extra_columns)
    try:
        summary = score_file(input_path, bundle, out, options, Settings(), Progress() if progress else None)
    except (SourceError, InputError, BadRowError, BundleError, GpuRequiredError) as error:
        if progress:
            print(file=sys.stderr)
        typer.echo(f"oodserve score: {error}", err=True)
        raise typer.Exit(code=2) from error
    if progress:
        print(file=sys.stderr)
    typer.echo(json.dumps(summary.to_json(), indent=2) if as_json else "\n".join(summary.lines()))


def register(app: typer.Typer) -> None:
    app.command(name="score")(score)
