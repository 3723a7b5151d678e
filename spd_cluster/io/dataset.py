"""Streaming prompt datasets: Parquet, JSONL, CSV -> shards of (prompt_id, prompt) rows.

`scan()` reads the whole file once, streaming, before any model loads: it fails on a missing
file, an unknown format, a corrupt file or a missing column (naming the file and the column),
counts the rows, finds duplicate ids and hashes the bytes (for resume). `iter_shards()` then
streams the file again and yields one shard of `shard_size` rows at a time, so the driver holds
a few shards, not the dataset.

Rows: `row` is the 0-based row number (JSONL blank lines are not rows); `prompt_id` is the id
column's value as a string (ids are compared as strings: 7 and "7" are the same id), or the row
number when there is no id column. `prompt` is the raw value; the engine turns non-strings,
empty prompts and overlong prompts into error rows. A duplicate or null id makes an error row
here, since only the driver sees the whole dataset.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

FORMATS = {".parquet": "parquet", ".pq": "parquet", ".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv"}
BATCH_ROWS = 1024


class DatasetError(ValueError):
    """A dataset file that cannot be read; the message names the file (and column)."""


@dataclass
class Row:
    row: int
    prompt_id: Optional[str]
    prompt: Any
    error: Optional[str] = None


@dataclass
class Shard:
    shard_id: int
    first_row: int
    rows: list[Row]

    def __len__(self) -> int:
        return len(self.rows)


@dataclass
class DatasetInfo:
    path: Path
    format: str
    num_rows: int
    sha256: str
    # row number -> error message for rows the driver rejects (duplicate or null id)
    row_errors: dict[int, str] = field(default_factory=dict)

    def num_shards(self, shard_size: int) -> int:
        return -(-self.num_rows // shard_size)


def detect_format(path: Path, fmt: Optional[str] = None) -> str:
    if fmt:
        return fmt
    f = FORMATS.get(path.suffix.lower())
    if f is None:
        raise DatasetError(
            f"dataset {path}: unknown format {path.suffix or '(no suffix)'!r}; "
            f"use one of {sorted(FORMATS)} or set dataset.format (parquet | jsonl | csv)"
        )
    return f


def _missing(path: Path, column: str, role: str, columns) -> DatasetError:
    return DatasetError(f"dataset {path}: no column {column!r} (dataset.{role}); columns are {sorted(columns)}")


def _parquet_batches(path: Path, prompt_col: str, id_col: Optional[str]) -> Iterator[tuple[list, Optional[list]]]:
    try:
        pf = pq.ParquetFile(path)
        names = pf.schema_arrow.names
    except (pa.ArrowException, OSError) as e:
        raise DatasetError(f"dataset {path}: not a readable Parquet file ({e})") from None
    for col, role in ((prompt_col, "prompt_column"), (id_col, "id_column")):
        if col is not None and col not in names:
            raise _missing(path, col, role, names)
    cols = [prompt_col] + ([id_col] if id_col else [])
    try:
        for batch in pf.iter_batches(batch_size=BATCH_ROWS, columns=cols):
            yield batch.column(0).to_pylist(), batch.column(1).to_pylist() if id_col else None
    except (pa.ArrowException, OSError) as e:
        raise DatasetError(f"dataset {path}: corrupt Parquet data ({e})") from None


def _jsonl_batches(path: Path, prompt_col: str, id_col: Optional[str]) -> Iterator[tuple[list, Optional[list]]]:
    seen_prompt = seen_id = False
    prompts, ids, total = [], [], 0
    with open(path, encoding="utf-8", errors="strict") as f:
        try:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DatasetError(f"dataset {path}: line {lineno} is not valid JSON ({e})") from None
                if not isinstance(obj, dict):
                    raise DatasetError(f"dataset {path}: line {lineno} is not a JSON object: {line.strip()[:80]!r}")
                total += 1
                seen_prompt |= prompt_col in obj
                prompts.append(obj.get(prompt_col))
                if id_col:
                    seen_id |= id_col in obj
                    ids.append(obj.get(id_col))
                if len(prompts) == BATCH_ROWS:
                    yield prompts, ids if id_col else None
                    prompts, ids = [], []
        except UnicodeDecodeError as e:
            raise DatasetError(f"dataset {path}: not UTF-8 text ({e})") from None
    if prompts:
        yield prompts, ids if id_col else None
    # A key that no row has is a missing column (a row without it is a bad row).
    if total and not seen_prompt:
        raise DatasetError(f"dataset {path}: no row has the key {prompt_col!r} (dataset.prompt_column)")
    if total and id_col and not seen_id:
        raise DatasetError(f"dataset {path}: no row has the key {id_col!r} (dataset.id_column)")


def _csv_batches(path: Path, prompt_col: str, id_col: Optional[str]) -> Iterator[tuple[list, Optional[list]]]:
    try:
        names = pacsv.open_csv(path).schema.names
    except (pa.ArrowException, OSError) as e:
        raise DatasetError(f"dataset {path}: not a readable CSV file ({e})") from None
    for col, role in ((prompt_col, "prompt_column"), (id_col, "id_column")):
        if col is not None and col not in names:
            raise _missing(path, col, role, names)
    cols = [prompt_col] + ([id_col] if id_col else [])
    # Everything as text: a prompt "42" stays a string; an empty cell is "", not null.
    conv = pacsv.ConvertOptions(include_columns=cols, column_types={c: pa.string() for c in cols},
                                strings_can_be_null=False)
    try:
        reader = pacsv.open_csv(path, read_options=pacsv.ReadOptions(block_size=1 << 20), convert_options=conv)
        for batch in reader:
            yield batch.column(0).to_pylist(), batch.column(1).to_pylist() if id_col else None
    except (pa.ArrowException, OSError) as e:
        raise DatasetError(f"dataset {path}: corrupt CSV data ({e})") from None


_READERS = {"parquet": _parquet_batches, "jsonl": _jsonl_batches, "csv": _csv_batches}


def _id_str(value: Any) -> Optional[str]:
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return value if isinstance(value, str) else json.dumps(value) if isinstance(value, (list, dict)) else str(value)


def iter_rows(path: str | Path, prompt_column: str = "prompt", id_column: Optional[str] = None,
              format: Optional[str] = None) -> Iterator[Row]:
    """Every row of the file, streaming (no id/duplicate errors here; see scan)."""
    p = Path(path)
    if not p.exists():
        raise DatasetError(f"dataset file not found: {p}")
    if not p.is_file():
        raise DatasetError(f"dataset {p}: not a file")
    fmt = detect_format(p, format)
    n = 0
    for prompts, ids in _READERS[fmt](p, prompt_column, id_column):
        for j, prompt in enumerate(prompts):
            yield Row(n, _id_str(ids[j]) if ids is not None else str(n), prompt)
            n += 1


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def scan(path: str | Path, prompt_column: str = "prompt", id_column: Optional[str] = None,
         format: Optional[str] = None) -> DatasetInfo:
    """One streaming pass that validates the whole file; see the module docstring."""
    p = Path(path)
    first_seen: dict[str, int] = {}
    errors: dict[int, str] = {}
    n = 0
    for r in iter_rows(p, prompt_column, id_column, format):
        n += 1
        if r.prompt_id is None:
            errors[r.row] = f"id column {id_column!r} is null"
        elif r.prompt_id in first_seen:
            errors[r.row] = f"duplicate prompt_id {r.prompt_id!r} (first at row {first_seen[r.prompt_id]})"
        else:
            first_seen[r.prompt_id] = r.row
    if n == 0:
        raise DatasetError(f"dataset {p}: no rows")
    return DatasetInfo(p, detect_format(p, format), n, _sha256(p), errors)


def iter_shards(info: DatasetInfo, shard_size: int, prompt_column: str = "prompt",
                id_column: Optional[str] = None) -> Iterator[Shard]:
    """Shards of `shard_size` consecutive rows (the last may be shorter), row errors attached."""
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    rows: list[Row] = []
    sid = 0
    for r in iter_rows(info.path, prompt_column, id_column, info.format):
        r.error = info.row_errors.get(r.row)
        rows.append(r)
        if len(rows) == shard_size:
            yield Shard(sid, rows[0].row, rows)
            rows, sid = [], sid + 1
    if rows:
        yield Shard(sid, rows[0].row, rows)
