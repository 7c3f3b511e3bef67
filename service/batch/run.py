"""Scoring on Ray Data: `score_dataset` (a Ray Dataset in, a Ray Dataset of verdicts out) and `score_file`
(what `oodserve score` runs: plan the input, start or join Ray, stream, write one Parquet file, summarise).

The pipeline is two stages: read tasks turn small read units into batches (`oodserve.batch.sources`), then a
pool of actors, each holding one `BatchScorer` (one Engine, built once), scores `batch_size` rows at a time
(`map_batches(BatchScorer, compute=ActorPoolStrategy(size=actors))`, one GPU per actor where the bundle runs on
CUDA). Ray Data streams: blocks are produced, scored and consumed with backpressure on the object store, so
memory is bounded by the store's size and the blocks in flight, not by the input's size. The driver consumes
the verdicts in stored order (`preserve_order`) and writes them to one Parquet file, which keeps `--drift`'s
stream in the order the rows are stored.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import ray.data
from ray.data import ActorPoolStrategy, DataContext, TaskPoolStrategy

from oodserve.bundle.loader import load_bundle
from oodserve.config import Settings
from oodserve.drift.monitor import DriftSettings
from oodserve.runtime.providers import available_providers
from oodserve.runtime.sessions import RuntimeOptions
from oodserve.scoring.inputs import InputError
from oodserve.stats import clopper_pearson

from .drift import StoredOrderDrift
from .scorer import ERROR_COLUMN, BatchScorer, Payload
from .sources import ROW_COLUMN, SOURCE_COLUMN, Source, plan_source, read_units

BAD_ROWS_SHOWN = 20
BLOCK_BYTES = 2 << 20
"""Ray Data's largest block: small, so verdicts reach the driver batch by batch (Ray's default, 128 MiB, would
hold a whole small table's verdicts in one block until its last row is scored)."""


class BadRowError(ValueError):
    """A row could not be scored and `on_bad_row` is `fail`: names the row's source, index and the reason."""


@dataclass(frozen=True)
class BatchOptions:
    """How a batch run is laid out: actors and their threads, batch size, Ray's address and store size."""

    alpha: float | None = None
    actors: int = 1
    batch_size: int = 4096
    threads: int = 0
    """onnxruntime intra-op threads per actor (0: this machine's cores divided among the actors)."""
    gpus_per_actor: float | None = None
    """None: 1 when onnxruntime here has the CUDA provider and the settings do not exclude it, else 0."""
    address: str | None = None
    """None: start a local Ray for the run (and stop it after); else join this cluster (`auto`, `ray://...`)."""
    object_store_mb: int = 256
    on_bad_row: Literal["skip", "fail"] = "skip"
    drift: bool = False
    id_column: str | None = None
    image_column: str | None = None
    allow_extra_columns: bool = False

    def threads_per_actor(self) -> int:
        return self.threads or max(1, (os.cpu_count() or 1) // self.actors)


@dataclass
class ScoreSummary:
    """What a run did: rows read, scored and bad, OOD count and rate at alpha with its 95% Clopper-Pearson
    interval (over the scored rows), time and throughput, the first bad rows and the drift report."""

    out: str
    rows: int = 0
    scored: int = 0
    bad_rows: int = 0
    ood: int = 0
    alpha: float = 0.0
    seconds: float = 0.0
    startup_seconds: float = 0.0
    """From the start to the first block of verdicts: Ray start (or join), read start, each actor's Engine load."""
    steady_rows: int = 0
    """Rows after the first block, over `seconds - startup_seconds`: the streaming throughput once running."""
    bad_examples: list[dict[str, Any]] = field(default_factory=list)
    drift: dict[str, Any] | None = None

    @property
    def ood_rate(self) -> float | None:
        return self.ood / self.scored if self.scored else None

    @property
    def interval(self) -> tuple[float, float] | None:
        return clopper_pearson(self.ood, self.scored) if self.scored else None

    @property
    def rows_per_second(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else math.nan

    @property
    def steady_rows_per_second(self) -> float:
        running = self.seconds - self.startup_seconds
        return self.steady_rows / running if running > 0 and self.steady_rows else math.nan

    def to_json(self) -> dict[str, Any]:
        return {
            "out": self.out, "rows": self.rows, "scored": self.scored, "bad_rows": self.bad_rows, "ood": self.ood, "alpha": self.alpha,
            "ood_rate": self.ood_rate, "ood_rate_ci95": list(self.interval) if self.interval else None, "seconds": self.seconds,
            "startup_seconds": self.startup_seconds, "rows_per_second": self.rows_per_second,
            "steady_rows_per_second": self.steady_rows_per_second, "bad_examples": self.bad_examples, "drift": self.drift,
        }

    def lines(self) -> list[str]:
        """The human summary `oodserve score` prints."""
        lines = [f"rows: {self.rows:,} read, {self.scored:,} scored, {self.bad_rows:,} bad (not scored; their `error` column says why)"]
        if self.scored:
            low, high = self.interval or (0.0, 1.0)
            lines.append(f"OOD at alpha {self.alpha:g}: {self.ood:,} of {self.scored:,} = {self.ood / self.scored:.2%} "
                         f"(95% Clopper-Pearson interval {low:.2%} to {high:.2%})")
        lines.append(f"time: {self.seconds:.1f} s, {self.rows_per_second:,.0f} rows/s ({self.startup_seconds:.1f} s to the first "
                     f"verdicts, then {self.steady_rows_per_second:,.0f} rows/s)")
        for example in self.bad_examples[:5]:
            lines.append(f"bad row {example['row']} of {example['source']}: {example['error']}")
        if self.bad_rows > 5:
            lines.append(f"... {self.bad_rows - 5:,} more bad rows")
        if self.drift is not None:
            for test in ("martingale", "change"):
                found = self.drift[test]
                where = (f"fired at stream position {found['position']:,} (row {found['row']} of {found['source']})"
                         if found["alarm"] else "no alarm")
                lines.append(f"drift {test}: {where} over {self.drift['inputs']:,} scored rows in stored order")
        lines.append(f"written: {self.out}")
        return lines


def runtime_options(settings: Settings, threads: int) -> RuntimeOptions:
    """The server's onnxruntime options (OODSERVE_* settings) with `threads` intra-op threads and one inter-op."""
    return dataclasses.replace(RuntimeOptions.from_settings(settings), intra_op_threads=threads, inter_op_threads=1)


def default_gpus_per_actor(options: RuntimeOptions) -> float:
    """1 when onnxruntime here has the CUDA provider and the settings' providers (if set) include it, else 0."""
    cuda = "CUDAExecutionProvider"
    wanted = options.providers is None or cuda in options.providers
    return 1.0 if wanted and cuda in available_providers() else 0.0


def score_dataset(dataset: ray.data.Dataset, bundle: str | Path, *, payload: Payload | None = None, alpha: float | None = None,
                  actors: int = 1, batch_size: int = 4096, options: RuntimeOptions | None = None,
                  gpus_per_actor: float | None = None) -> ray.data.Dataset:
    """Verdicts for every row of `dataset` as a lazy Ray Dataset (the columns of `BatchScorer`).

    The payload defaults to the bundle's feature columns for vector bundles and to an `image` column of
    instances (what `ray.data.read_images` gives) for image bundles; pass `Payload("encoded", "bytes")` for a
    column of PNG/JPEG bytes. Other input columns are carried to the output.
    """
    spec = load_bundle(bundle).manifest.input
    payload = payload or (Payload("features") if spec.features else Payload("array", "image"))
    options = options or runtime_options(Settings(), max(1, (os.cpu_count() or 1) // actors))
    gpus = default_gpus_per_actor(options) if gpus_per_actor is None else gpus_per_actor
    return dataset.map_batches(
        BatchScorer,
        fn_constructor_kwargs={"bundle": str(bundle), "payload": payload, "alpha": alpha, "options": options},
        compute=ActorPoolStrategy(size=actors),
        batch_size=batch_size,
        batch_format="numpy",
        num_cpus=1,
        num_gpus=gpus,
    )


def score_frame(frame: Any, bundle: str | Path, *, alpha: float | None = None, payload: Payload | None = None,
                options: RuntimeOptions | None = None, batch_size: int = 4096) -> Any:
    """Verdicts for a small pandas DataFrame (feature columns, or `payload`'s column) or a numpy array of
    instances `(N, *instance shape)`, in this process and without Ray: a pandas DataFrame, one row per input row."""
    import pandas as pd  # type: ignore[import-untyped]  # ships with ray[data]; no stubs installed

    scorer_payload = payload
    if isinstance(frame, np.ndarray):
        columns: dict[str, np.ndarray] = {ROW_COLUMN: np.arange(len(frame), dtype=np.int64), "__array__": frame}
        scorer_payload = Payload("array", "__array__")
    else:
        columns = {name: frame[name].to_numpy() for name in frame.columns}
    scorer = BatchScorer(bundle, scorer_payload or Payload("features"), alpha, options or runtime_options(Settings(), 0))
    count = len(next(iter(columns.values())))
    tables = [scorer({name: values[start : start + batch_size] for name, values in columns.items()})
              for start in range(0, count, batch_size)]
    return pa.concat_tables(tables).to_pandas() if tables else pd.DataFrame()


@contextmanager
def ray_session(address: str | None, cpus: int, object_store_mb: int) -> Iterator[None]:
    """Join `address`, or start a small local Ray (no dashboard, a bounded object store) and stop it after;
    an already initialised Ray (a notebook's, a test's) is used as it is."""
    if ray.is_initialized():
        yield
        return
    if address is not None:
        ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
    else:
        ray.init(num_cpus=cpus, include_dashboard=False, object_store_memory=object_store_mb << 20, log_to_driver=False,
                 logging_level=logging.WARNING, configure_logging=True)
    try:
        yield
    finally:
        ray.shutdown()


def build_pipeline(source: Source, bundle: Path, options: BatchOptions, runtime: RuntimeOptions) -> ray.data.Dataset:
    """Read units -> batches (tasks) -> verdicts (one BatchScorer per actor), in stored order."""
    context = DataContext.get_current()
    context.execution_options.preserve_order = True
    context.enable_progress_bars = False
    context.target_max_block_size = BLOCK_BYTES
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # the command reports its own progress and summary
    units = ray.data.from_items([{"unit": json.dumps(unit)} for unit in source.units], override_num_blocks=max(1, len(source.units)))
    batches = units.map_batches(read_units, batch_size=1, batch_format="numpy", fn_kwargs={"rows_per_batch": options.batch_size},
                                num_cpus=0.5, compute=TaskPoolStrategy(size=min(2, len(source.units))))
    return score_dataset(batches, bundle, payload=source.payload, alpha=options.alpha, actors=options.actors,
                         batch_size=options.batch_size, options=runtime, gpus_per_actor=options.gpus_per_actor)


def score_file(input_path: Path, bundle: Path, out: Path, options: BatchOptions | None = None, settings: Settings | None = None,
               progress: Callable[[int, int | None], None] | None = None) -> ScoreSummary:
    """Score INPUT with `bundle` into the Parquet file `out` (written whole or not at all) and summarise.

    SourceError when the input does not fit the bundle, InputError for an alpha the bundle cannot resolve,
    BadRowError on the first bad row when `on_bad_row` is `fail`.
    """
    options = options or BatchOptions()
    settings = settings or Settings()
    verified = load_bundle(bundle)
    spec = verified.manifest.input
    alpha = verified.manifest.default_alpha if options.alpha is None else options.alpha
    minimum = verified.calibration.minimum_p_value
    if alpha <= minimum:
        raise InputError("alpha_below_resolution", f"alpha {alpha:g} is not above the smallest p-value bundle "
                         f"{verified.manifest.name!r} can give ({minimum:.6g})")
    source = plan_source(input_path, spec, id_column=options.id_column, image_column=options.image_column,
                         allow_extra_columns=options.allow_extra_columns)
    runtime = runtime_options(settings, options.threads_per_actor())
    drift = StoredOrderDrift(verified.calibration.fused, DriftSettings.from_settings(settings)) if options.drift else None
    summary = ScoreSummary(out=str(out), alpha=alpha)
    partial = out.with_name(out.name + ".partial")
    out.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    cpus = max(os.cpu_count() or 1, options.actors) + 1
    writer: pq.ParquetWriter | None = None
    try:
        with ray_session(options.address, cpus, options.object_store_mb):
            pipeline = build_pipeline(source, bundle, dataclasses.replace(options, alpha=alpha), runtime)
            for block in pipeline.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=1):
                table: pa.Table = block
                if writer is None:
                    writer = pq.ParquetWriter(partial, table.schema)
                    summary.startup_seconds = time.perf_counter() - started
                    summary.steady_rows = -table.num_rows
                else:
                    table = table.cast(writer.schema)
                _account(summary, table, options.on_bad_row, drift)
                writer.write_table(table)
                if progress is not None:
                    progress(summary.rows, source.rows)
        if writer is None:
            writer = pq.ParquetWriter(partial, pa.schema([(SOURCE_COLUMN, pa.string()), (ROW_COLUMN, pa.int64())]))
        writer.close()
        writer = None
        summary.seconds = time.perf_counter() - started
        summary.steady_rows = max(0, summary.steady_rows + summary.rows)
        partial.replace(out)
    finally:
        if writer is not None:
            writer.close()
        partial.unlink(missing_ok=True)
    summary.drift = drift.report() if drift is not None else None
    return summary


def _account(summary: ScoreSummary, table: pa.Table, on_bad_row: str, drift: StoredOrderDrift | None) -> None:
    """Count a scored block into the summary (rows, bad rows, OOD) and feed its fused scores to the drift tests."""
    errors = table.column(ERROR_COLUMN)
    bad_mask = ~np.asarray(errors.is_null().to_numpy(zero_copy_only=False), dtype=bool)
    summary.rows += table.num_rows
    if bad_mask.any():
        sources = table.column(SOURCE_COLUMN).to_pylist() if SOURCE_COLUMN in table.column_names else [None] * table.num_rows
        rows = table.column(ROW_COLUMN).to_pylist() if ROW_COLUMN in table.column_names else list(range(table.num_rows))
        messages = errors.to_pylist()
        for index in np.flatnonzero(bad_mask):
            if on_bad_row == "fail":
                raise BadRowError(f"row {rows[index]} of {sources[index]}: {messages[index]} (--on-bad-row skip scores the other rows)")
            if len(summary.bad_examples) < BAD_ROWS_SHOWN:
                summary.bad_examples.append({"source": sources[index], "row": rows[index], "error": messages[index]})
        summary.bad_rows += int(bad_mask.sum())
    good = ~bad_mask
    summary.scored += int(good.sum())
    is_ood = table.column("is_ood").to_numpy(zero_copy_only=False)
    summary.ood += int(np.sum(is_ood[good].astype(bool)))
    if drift is not None and good.any():
        scores = table.column("score").to_numpy(zero_copy_only=False)[good].astype(np.float64)
        sources_all = np.asarray(table.column(SOURCE_COLUMN).to_pylist(), dtype=object)[good]
        rows_all = table.column(ROW_COLUMN).to_numpy()[good]
        drift.observe(scores, sources_all, rows_all)


class Progress:
    """A one-line progress report on stderr: rows, percent when the total is known, rows/s."""

    def __init__(self) -> None:
        self.started = time.perf_counter()

    def __call__(self, rows: int, total: int | None) -> None:
        rate = rows / max(time.perf_counter() - self.started, 1e-9)
        share = f" / {total:,} ({rows / total:.0%})" if total else ""
        print(f"\rscored {rows:,}{share} rows, {rate:,.0f} rows/s", end="", file=sys.stderr, flush=True)
