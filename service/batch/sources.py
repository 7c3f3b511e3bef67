"""What `oodserve score` reads: an INPUT path checked against the bundle and cut into read units, and the reader
that turns one unit into batches (dicts of numpy arrays) with the rows' `source` and `row` index.

Kinds of input:

- `table`: Parquet or CSV files (one file, or a folder of them, read in sorted path order); vector bundles take
  the columns named by the bundle's feature names; with `image_column` a Parquet column of encoded images;
- `npy`: one `.npy` file of instances `(N, *instance shape)`, memory-mapped and read in slices;
- `images`: a folder of PNG/JPEG files (sorted by path; subfolders included), for image and backbone bundles.

Units are small (a Parquet row group, a CSV file read block by block, a slice of a `.npy`, a chunk of image
paths), so the reader's memory is bounded whatever the input's size. The `row` of a table row is its index in
its file, of an image its index in the sorted listing: the index bad rows are reported by.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from oodserve.bundle.manifest import InputSpec
from oodserve.scoring.arrays import check_batch_shape
from oodserve.scoring.inputs import InputError
from oodserve.scoring.payloads import image_size

from .scorer import ARRAY_COLUMN, ENCODED_COLUMN, Payload

TABLE_SUFFIXES = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv"}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}
SOURCE_COLUMN, ROW_COLUMN = "source", "row"
CSV_BLOCK_BYTES = 4 << 20
IMAGES_PER_UNIT = 512


class SourceError(ValueError):
    """The input does not fit the bundle (a missing or extra column, a wrong shape, an unknown file kind)."""


@dataclass(frozen=True)
class Source:
    """A planned input: its kind, the payload the scorer reads, the read units and the rows when known."""

    kind: Literal["table", "npy", "images"]
    payload: Payload
    units: list[dict[str, Any]]
    rows: int | None
    files: list[Path]
    carried: list[str] = field(default_factory=list)
    """Input columns carried to the output besides `source` and `row` (the id column)."""


def _files(path: Path, suffixes: set[str]) -> list[Path]:
    return sorted(item for item in path.rglob("*") if item.is_file() and item.suffix.lower() in suffixes)


def table_columns(path: Path) -> list[str]:
    """The column names of a Parquet file (its schema) or CSV file (its header)."""
    if TABLE_SUFFIXES[path.suffix.lower()] == "parquet":
        return list(pq.read_schema(path).names)
    with pa_csv.open_csv(path, read_options=pa_csv.ReadOptions(block_size=1 << 16)) as reader:
        return list(reader.schema.names)


def check_columns(path: Path, columns: list[str], needed: list[str], id_column: str | None, allow_extra: bool) -> None:
    """SourceError naming the missing columns, and the extra ones unless `allow_extra`."""
    present = set(columns)
    missing = [name for name in needed if name not in present]
    if id_column is not None and id_column not in present:
        missing.append(id_column)
    extra = [name for name in columns if name not in set(needed) and name != id_column]
    problems = []
    if missing:
        problems.append(f"missing column{'s' if len(missing) > 1 else ''} {missing}")
    if extra and not allow_extra:
        problems.append(f"extra column{'s' if len(extra) > 1 else ''} {extra} (name an id with --id-column, or pass --allow-extra-columns)")
    if problems:
        raise SourceError(f"{path}: {' and '.join(problems)}; the bundle reads the columns {needed}")


def plan_source(path: Path, spec: InputSpec, *, id_column: str | None = None, image_column: str | None = None,
                allow_extra_columns: bool = False, npy_rows_per_unit: int = 65536) -> Source:
    """Check INPUT against the bundle's input spec and cut it into read units (SourceError when it does not fit)."""
    if not path.exists():
        raise SourceError(f"{path}: no such file or folder")
    if path.is_file() and path.suffix.lower() == ".npy":
        return _plan_npy(path, spec, npy_rows_per_unit)
    if path.is_file():
        tables = [path] if path.suffix.lower() in TABLE_SUFFIXES else []
    else:
        tables = _files(path, set(TABLE_SUFFIXES))
    images = _files(path, IMAGE_SUFFIXES) if path.is_dir() else []
    if tables and images:
        raise SourceError(f"{path}: holds both tables ({tables[0].name}, ...) and images ({images[0].name}, ...); score one kind at a time")
    if images:
        _check_images(path, spec)
        chunks = [{"kind": "images", "paths": [str(item) for item in images[start : start + IMAGES_PER_UNIT]], "first": start}
                  for start in range(0, len(images), IMAGES_PER_UNIT)]
        return Source("images", Payload("encoded", ENCODED_COLUMN), chunks, len(images), images)
    if not tables:
        raise SourceError(f"{path}: not a Parquet, CSV or .npy file, nor a folder of Parquet/CSV files or PNG/JPEG images")
    if image_column is not None:
        _check_images(path, spec)
        payload, needed = Payload("encoded", image_column), [image_column]
    elif spec.features:
        payload, needed = Payload("features"), list(spec.features)
    else:
        raise SourceError(f"{path}: bundle input {spec.shape} has no feature names; for a column of encoded images pass --image-column")
    units: list[dict[str, Any]] = []
    rows: int | None = 0
    for table in tables:
        columns = table_columns(table)
        chosen_id = id_column if id_column is not None else ("id" if "id" in columns and "id" not in needed else None)
        check_columns(table, columns, needed, chosen_id, allow_extra_columns)
        wanted = needed + ([chosen_id] if chosen_id else [])
        if TABLE_SUFFIXES[table.suffix.lower()] == "parquet":
            metadata = pq.ParquetFile(table).metadata
            first = 0
            for group in range(metadata.num_row_groups):
                units.append({"kind": "parquet", "path": str(table), "row_group": group, "first": first, "columns": wanted,
                              "id": chosen_id})
                first += metadata.row_group(group).num_rows
            rows = None if rows is None else rows + metadata.num_rows
        else:
            units.append({"kind": "csv", "path": str(table), "columns": wanted, "strings": needed, "id": chosen_id})
            rows = None
    carried = ["id"] if any(unit["id"] for unit in units) else []
    return Source("table", payload, units, rows, tables, carried)


def _check_images(path: Path, spec: InputSpec) -> None:
    try:
        image_size(spec)
    except InputError as error:
        raise SourceError(f"{path}: images need an image bundle: {error}") from error


def _plan_npy(path: Path, spec: InputSpec, rows_per_unit: int) -> Source:
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as error:
        raise SourceError(f"{path}: cannot be read as a .npy array: {error}") from error
    try:
        check_batch_shape(list(array.shape), spec.shape, max(1, len(array)))
    except InputError as error:
        raise SourceError(f"{path}: {error}") from error
    if array.dtype.kind not in "uif":
        raise SourceError(f"{path}: dtype {array.dtype.str!r} is not accepted; send integers or floats")
    count = len(array)
    units = [{"kind": "npy", "path": str(path), "start": start, "stop": min(count, start + rows_per_unit)}
             for start in range(0, count, rows_per_unit)]
    return Source("npy", Payload("array", ARRAY_COLUMN), units, count, [path])


def _located(source: str, first: int, count: int) -> dict[str, np.ndarray]:
    return {SOURCE_COLUMN: np.full(count, source, dtype=object), ROW_COLUMN: np.arange(first, first + count, dtype=np.int64)}


def _table_batch(table: pa.Table | pa.RecordBatch, source: str, first: int, id_column: str | None) -> dict[str, np.ndarray]:
    batch = _located(source, first, table.num_rows)
    for name in table.column_names:
        values = table.column(name).to_numpy(zero_copy_only=False)
        batch["id" if name == id_column else name] = values
    return batch


def read_unit(unit: dict[str, Any], rows_per_batch: int = 65536) -> Iterator[dict[str, np.ndarray]]:
    """The batches of one read unit (from `plan_source`), each with `source` and `row` columns."""
    kind, path = unit["kind"], unit.get("path", "")
    if kind == "parquet":
        first = unit["first"]
        for record in pq.ParquetFile(path).iter_batches(batch_size=rows_per_batch, row_groups=[unit["row_group"]], columns=unit["columns"]):
            yield _table_batch(record, path, first, unit["id"])
            first += record.num_rows
    elif kind == "csv":
        convert = pa_csv.ConvertOptions(column_types={name: pa.string() for name in unit["strings"]}, include_columns=unit["columns"])
        first = 0
        with pa_csv.open_csv(path, read_options=pa_csv.ReadOptions(block_size=CSV_BLOCK_BYTES), convert_options=convert) as reader:
            for record in reader:
                yield _table_batch(record, path, first, unit["id"])
                first += record.num_rows
    elif kind == "npy":
        array = np.load(path, mmap_mode="r", allow_pickle=False)
        for start in range(unit["start"], unit["stop"], rows_per_batch):
            stop = min(unit["stop"], start + rows_per_batch)
            yield {**_located(path, start, stop - start), ARRAY_COLUMN: np.ascontiguousarray(array[start:stop])}
    elif kind == "images":
        paths = unit["paths"]
        batch = _located("", unit["first"], len(paths))
        batch[SOURCE_COLUMN] = np.array(paths, dtype=object)
        batch[ENCODED_COLUMN] = np.array([Path(item).read_bytes() for item in paths], dtype=object)
        yield batch
    else:
        raise ValueError(f"unknown read unit kind {kind!r}")


def read_units(batch: dict[str, np.ndarray], rows_per_batch: int = 65536) -> Iterator[dict[str, np.ndarray]]:
    """Ray Data read stage: a batch of JSON-encoded units -> their batches (a generator, so memory stays bounded)."""
    for text in batch["unit"].tolist():
        yield from read_unit(json.loads(text), rows_per_batch)
