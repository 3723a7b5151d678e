"""Streaming prompt datasets: Parquet, JSONL, CSV, text -> shards of (prompt_id, prompt) rows.

`scan()` reads the whole file once, streaming, before any model loads: it fails on a missing
file, an unknown format, a corrupt file or a missing column (naming the file and the column),
counts the rows, finds duplicate ids and hashes the bytes (for resume). `iter_shards()` then
streams the file again and yields one shard of `shard_size` rows at a time, so the driver holds
a few shards, not the dataset.

Rows: `row` is the 0-based row number (JSONL blank lines are not rows); `prompt_id` is the id
column's value as a string (ids are compared as strings: 7 and "7" are the same id), or the row
number when there is no id column. A text file (`.txt`, also compressed) is one prompt per line
(line terminators dropped, blank lines skipped); it has no columns, so the prompt and id
columns do not apply and a prompt's id is its 1-based line number (`file:line` in a file set).
A directory's files are its Parquet, JSONL and CSV ones; .txt files are read where they are
named (the file, or a glob: `prompts/*.txt`), since beside data files a .txt is mostly a README. A prompt is a string: any other value (null, a number, a
list of strings, a list of token ids) makes an error row here, named by its line (JSONL) or
row, and so does a duplicate or null id, since only the driver sees the whole dataset; the
engine turns empty and overlong prompts into error rows. A file that cannot be read (bad UTF-8,
bad JSON, damaged Parquet) is a DatasetError naming the file and, where it can be found, the line.
"""

from __future__ import annotations

import difflib
import hashlib
import io
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Iterator, Optional

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from . import fs as fsmod
from .fs import Location

FORMATS = {".parquet": "parquet", ".pq": "parquet", ".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv",
           ".txt": "text"}
COMPRESSION = (".gz", ".zst", ".bz2")  # text formats only; read through pyarrow's decompressing streams
SUFFIXES = tuple(s + c for s in FORMATS for c in ("", *COMPRESSION) if not (c and FORMATS[s] == "parquet"))
# what a directory contributes: not .txt, which beside data files is far more often a README or
# notes than prompts (a glob such as data/*.txt, or the file itself, names text prompt files)
DIR_SUFFIXES = tuple(s for s in SUFFIXES if not s.startswith(".txt"))
BATCH_ROWS = 1024
log = logging.getLogger("spd_cluster.dataset")


class DatasetError(ValueError):
    """A dataset file that cannot be read; the message names the file (and column)."""


@dataclass
class Row:
    row: int
    prompt_id: Optional[str]
    prompt: Any
    error: Optional[str] = None
    line: Optional[int] = None  # JSONL: the 1-based line of the row in its file
    file: Optional[str] = None  # a file set: the row's file, relative to the dataset's root
    file_row: Optional[int] = None  # and its 0-based row in that file

    def where(self) -> str:
        """The row as a user finds it: its file (in a file set), line (JSONL) or row number, and its id."""
        at = f"line {self.line}" if self.line is not None else f"row {self.row if self.file is None else self.file_row}"
        at = f"{self.file} {at}" if self.file is not None else at
        return at + (f" (id {self.prompt_id!r})" if self.prompt_id is not None else "")


@dataclass
class Shard:
    shard_id: int
    first_row: int
    rows: list[Row]

    def __len__(self) -> int:
        return len(self.rows)


@dataclass
class DatasetInfo:
    path: str  # as the config names it: a file, a directory or a glob; local or a URI
    format: str
    num_rows: int
    sha256: str
    # row number -> error message for rows the driver rejects (duplicate or null id, not a string)
    row_errors: dict[int, str] = field(default_factory=dict)
    options: Optional[dict] = None  # filesystem options the dataset is read with

    def num_shards(self, shard_size: int) -> int:
        return -(-self.num_rows // shard_size)


def detect_format(path, fmt: Optional[str] = None) -> str:
    """The format named by ``fmt``, else by the file's suffix (a .gz/.zst/.bz2 one stripped)."""
    if fmt:
        return fmt
    name = PurePosixPath(str(path)).name.lower()
    stem = next((name[: -len(c)] for c in COMPRESSION if name.endswith(c)), name)
    f = FORMATS.get(PurePosixPath(stem).suffix)
    if f is None:
        suffix = PurePosixPath(name).suffix
        raise DatasetError(
            f"dataset {path}: unknown format {suffix or '(no suffix)'!r}; use one of {sorted(FORMATS)} "
            "(text ones also compressed: .gz, .zst, .bz2) or set dataset.format (parquet | jsonl | csv | text)"
        )
    return f


def _open_text(loc: Location):
    """A byte stream of a text file, decompressed by its suffix."""
    return io.BufferedReader(loc.fs.open_input_stream(loc.path, compression="detect"))


def _missing(path: Path, column: str, role: str, columns, jsonl: bool = False) -> DatasetError:
    found = sorted(map(str, columns))
    near = difflib.get_close_matches(column, found, n=1)
    listed = found[:30] + ([f"... {len(found) - 30} more"] if len(found) > 30 else [])
    what = f"no row has the key {column!r}" if jsonl else f"no column {column!r}"
    return DatasetError(f"dataset {path}: {what} (dataset.{role}); {'keys' if jsonl else 'columns'} found: {listed}"
                        + (f"; did you mean {near[0]!r}?" if near else ""))


def _utf8_error_at(path: Location) -> Optional[tuple[int, int, int]]:
    """(line, column, byte) of the first byte of ``path`` that is not UTF-8, or None. Line by
    line is exact: no UTF-8 character holds a newline byte."""
    with _open_text(path) as f:
        for lineno, line in enumerate(f, 1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as e:
                return lineno, len(line[: e.start].decode("utf-8")) + 1, line[e.start]
    return None


def _utf8_message(path: Location) -> str:
    at = _utf8_error_at(path)
    if at is None:
        return "not UTF-8 text"
    return f"line {at[0]} is not valid UTF-8 (byte 0x{at[2]:02x} at column {at[1]})"


def _parquet_batches(path: Location, prompt_col: str, id_col: Optional[str]) -> Iterator[tuple]:
    try:
        pf = pq.ParquetFile(path.fs.open_input_file(path.path))
        names = pf.schema_arrow.names
    except (pa.ArrowException, OSError) as e:
        raise DatasetError(f"dataset {path}: not a readable Parquet file ({e})") from None
    for col, role in ((prompt_col, "prompt_column"), (id_col, "id_column")):
        if col is not None and col not in names:
            raise _missing(path, col, role, names)
    cols = [prompt_col] + ([id_col] if id_col else [])
    n = 0
    try:
        for batch in pf.iter_batches(batch_size=BATCH_ROWS, columns=cols):
            out = []
            for name, col in zip(cols, batch.columns):
                try:
                    out.append(col.to_pylist())
                except UnicodeDecodeError:  # a damaged page: name the first bad row
                    bad = next(i for i in range(len(col)) if not _decodes(col[i]))
                    raise DatasetError(f"dataset {path}: corrupt Parquet data: column {name!r} row {n + bad} "
                                       "is not valid UTF-8 (the file is damaged)") from None
            yield out[0], out[1] if id_col else None, None
            n += batch.num_rows
    except DatasetError:
        raise
    except Exception as e:  # noqa: BLE001 - whatever a damaged file raises, say which file
        raise DatasetError(f"dataset {path}: corrupt Parquet data after row {n} ({type(e).__name__}: {e})") from None


def _decodes(scalar) -> bool:
    try:
        scalar.as_py()
        return True
    except UnicodeDecodeError:
        return False


def _decoded_lines(path: Location, f) -> Iterator[tuple[int, str]]:
    """(line number, text) of each line of the byte stream ``f`` (a BOM dropped from the first):
    read as bytes, so a bad UTF-8 byte is named by its line and column, not a buffer offset."""
    for lineno, raw in enumerate(f, 1):
        try:
            yield lineno, raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
        except UnicodeDecodeError as e:
            col = len(raw[: e.start].decode("utf-8", "replace")) + 1
            raise DatasetError(f"dataset {path}: line {lineno} is not valid UTF-8 "
                               f"(byte 0x{raw[e.start]:02x} at column {col})") from None


def _jsonl_batches(path: Location, prompt_col: str, id_col: Optional[str]) -> Iterator[tuple]:
    seen_prompt = seen_id = False
    keys: set = set()
    prompts, ids, lines, total = [], [], [], 0
    with _open_text(path) as f:
        for lineno, line in _decoded_lines(path, f):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except (json.JSONDecodeError, RecursionError) as e:
                raise DatasetError(f"dataset {path}: line {lineno} is not valid JSON ({e})") from None
            if not isinstance(obj, dict):
                raise DatasetError(f"dataset {path}: line {lineno} is not a JSON object: {line.strip()[:80]!r}")
            total += 1
            seen_prompt |= prompt_col in obj
            if len(keys) < 100:
                keys.update(obj)
            prompts.append(obj.get(prompt_col))
            lines.append(lineno)
            if id_col:
                seen_id |= id_col in obj
                ids.append(obj.get(id_col))
            if len(prompts) == BATCH_ROWS:
                yield prompts, ids if id_col else None, lines
                prompts, ids, lines = [], [], []
    if prompts:
        yield prompts, ids if id_col else None, lines
    # A key that no row has is a missing column (a row without it is a bad row).
    if total and not seen_prompt:
        raise _missing(path, prompt_col, "prompt_column", keys, jsonl=True)
    if total and id_col and not seen_id:
        raise _missing(path, id_col, "id_column", keys, jsonl=True)


def _csv_batches(path: Location, prompt_col: str, id_col: Optional[str]) -> Iterator[tuple]:
    try:
        with _open_text(path) as f:
            names = pacsv.open_csv(f).schema.names
    except UnicodeDecodeError:
        raise DatasetError(f"dataset {path}: {_utf8_message(path)}") from None
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
        with _open_text(path) as f:
            reader = pacsv.open_csv(f, read_options=pacsv.ReadOptions(block_size=1 << 20), convert_options=conv)
            for batch in reader:
                yield batch.column(0).to_pylist(), batch.column(1).to_pylist() if id_col else None, None
    except Exception as e:  # noqa: BLE001 - whatever a bad file raises, say which file (and line)
        if isinstance(e, UnicodeDecodeError) or "UTF8" in str(e):
            raise DatasetError(f"dataset {path}: {_utf8_message(path)}") from None
        raise DatasetError(f"dataset {path}: corrupt CSV data ({type(e).__name__}: {e})") from None


def _text_batches(path: Location, prompt_col: str, id_col: Optional[str]) -> Iterator[tuple]:
    """One prompt per line; blank (or whitespace-only) lines are not rows. The ids are the line
    numbers, so they stay put when lines are added below (the columns do not apply)."""
    prompts, lines = [], []
    with _open_text(path) as f:
        for lineno, line in _decoded_lines(path, f):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            prompts.append(line)
            lines.append(lineno)
            if len(prompts) == BATCH_ROWS:
                yield prompts, None, lines
                prompts, lines = [], []
    if prompts:
        yield prompts, None, lines


_READERS = {"parquet": _parquet_batches, "jsonl": _jsonl_batches, "csv": _csv_batches, "text": _text_batches}


def _id_str(value: Any) -> Optional[str]:
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, str):
        return value
    return json.dumps(value, default=str) if isinstance(value, (list, dict)) else str(value)


def prompt_problem(value: Any, column: str = "prompt") -> Optional[str]:
    """Why a dataset value is not a prompt, or None. Prompts are strings: a list of token ids is
    refused like any other non-string (the in-process engine still takes token ids; a dataset
    cell that happens to hold numbers is far more often a mistake than a tokenized prompt)."""
    if isinstance(value, str):
        return None  # empty and overlong prompts are the engine's to judge (it has the tokenizer)
    if value is None:
        return f"no prompt: {column!r} is null or missing"
    if isinstance(value, (list, tuple)):
        kinds = ", ".join(sorted({type(x).__name__ for x in value})) or "nothing"
        return f"prompt is a list of {len(value)} ({kinds}), not a string; a prompt is text"
    text = repr(value)
    return f"prompt is {type(value).__name__} {text[:60] + '...' if len(text) > 60 else text}, not a string"


def dataset_files(path: str | Path, options: Optional[dict] = None) -> tuple[list[Location], Optional[Location]]:
    """The files of a dataset and, for a file set (a directory or a glob), its root: the prefix
    that row identities (``file:row``) are relative to. Sorted by path, so the same whatever
    order a listing gives."""
    try:
        loc = fsmod.resolve(str(path), options)
    except ValueError as e:
        raise DatasetError(f"dataset {e}") from None
    try:
        if not fsmod.has_glob(loc.path) and loc.is_file():
            return [loc], None
        files = fsmod.list_files(loc, DIR_SUFFIXES)
    except OSError as e:
        raise DatasetError(f"dataset {path}: cannot be listed ({e})") from None
    if not files:
        if fsmod.has_glob(loc.path) or loc.is_dir():
            raise DatasetError(f"dataset {path}: no {', '.join(sorted(set(FORMATS.values()) - {'text'}))} files "
                               "(text ones also .gz/.zst/.bz2) there; .txt files (one prompt per line) are read "
                               "where named: the file, or a glob (dir/*.txt)")
        raise DatasetError(f"dataset file not found: {path}")
    root = loc.path
    while fsmod.has_glob(root):
        root = str(PurePosixPath(root).parent)
    return files, Location(loc.fs, root, str(path))


def iter_rows(path: str | Path, prompt_column: str = "prompt", id_column: Optional[str] = None,
              format: Optional[str] = None, options: Optional[dict] = None) -> Iterator[Row]:
    """Every row of the dataset, streaming, file after file (no row errors here; see scan).
    Without an id column a row's id is its row number, in a file set ``file:row`` (its file
    relative to the set's root and its row there), so it survives files added beside it."""
    yield from _iter_files(*dataset_files(path, options), prompt_column, id_column, format)


def _iter_files(files: list[Location], root: Optional[Location], prompt_column: str, id_column: Optional[str],
                format: Optional[str]) -> Iterator[Row]:
    n = 0
    for f in files:
        fmt = detect_format(f.path, format)
        rel = None if root is None else f.path[len(root.path):].lstrip("/")
        i = 0
        try:
            for prompts, ids, lines in _READERS[fmt](f, prompt_column, id_column):
                for j, prompt in enumerate(prompts):
                    if fmt == "text":  # no columns: a prompt is known by its line
                        pid = str(lines[j]) if rel is None else f"{rel}:{lines[j]}"
                    else:
                        pid = _id_str(ids[j]) if ids is not None else (str(n) if rel is None else f"{rel}:{i}")
                    yield Row(n, pid, prompt, line=lines[j] if lines is not None else None, file=rel, file_row=i)
                    n += 1
                    i += 1
        except DatasetError:
            raise
        except Exception as e:  # noqa: BLE001 - an unreadable file is a clear error, never a traceback
            raise DatasetError(f"dataset {f}: cannot be read as {fmt} after row {i} ({type(e).__name__}: {e})") from None


def fingerprint(files: list[Location], root: Optional[Location]) -> str:
    """What resume compares to know the dataset is unchanged: a single local file's sha256 (as
    before), else a sha256 over each file's name, size and modification time, which costs one
    listing, not another read, on object storage."""
    if root is None and files[0].local:
        h = hashlib.sha256()
        with files[0].fs.open_input_stream(files[0].path) as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        return h.hexdigest()
    h = hashlib.sha256()
    for f in files:
        info = f.info()
        h.update(json.dumps([f.path, info.size, info.mtime_ns]).encode())
    return h.hexdigest()


class SeenIds:
    """The ids a scan has seen, 24 bytes an id however long it is: a 128-bit hash (two of
    Python's keyed string hashes, of the id and of the id with a NUL after it) and the row it
    was first seen at, in runs sorted by the first 64 bits that merge as they grow (a
    log-structured set): a batch of ids costs a few binary searches. Two distinct ids share both
    hashes with odds of about n^2 / 2^129 (1e-26 for ten million ids)."""

    def __init__(self):
        import numpy as np

        self._np = np
        self.runs: list[tuple] = []  # (hi sorted, lo, first rows), largest run first

    def add(self, ids: list[str], rows: list[int]) -> list[int]:
        """For each id, the row of an earlier equal id (this batch included), else -1; the ids
        not seen before are kept."""
        np = self._np
        if not ids:
            return []
        hi = np.fromiter(map(hash, ids), dtype=np.int64, count=len(ids))
        lo = np.fromiter((hash(i + "\0") for i in ids), dtype=np.int64, count=len(ids))
        first = np.full(len(ids), -1, dtype=np.int64)
        in_batch: dict[tuple, int] = {}
        for i, key in enumerate(zip(hi.tolist(), lo.tolist())):
            j = in_batch.setdefault(key, i)
            if j != i:
                first[i] = rows[j]
        for rh, rl, rr in self.runs:  # a run holds each id once, at its first row: earlier than this batch
            pos = np.searchsorted(rh, hi)
            at = np.minimum(pos, rh.size - 1)
            same_hi = rh[at] == hi
            hit = same_hi & (rl[at] == lo)
            first[hit] = rr[at[hit]]
            for i in np.flatnonzero(same_hi & ~hit):  # 64 equal bits, not 128: the others with that hi
                j = int(pos[i]) + 1
                while j < rh.size and rh[j] == hi[i]:
                    if rl[j] == lo[i]:
                        first[i] = rr[j]
                        break
                    j += 1
        new = first < 0
        order = np.argsort(hi[new], kind="stable")
        run = (hi[new][order], lo[new][order], np.asarray(rows, dtype=np.int64)[new][order])
        while self.runs and self.runs[-1][0].size <= run[0].size:
            run = self._merge(self.runs.pop(), run)
        self.runs.append(run)
        return first.tolist()

    def _merge(self, a: tuple, b: tuple) -> tuple:
        """Two runs as one, in one pass: b's entries go where a binary search in a puts them."""
        np = self._np
        from_b = np.zeros(a[0].size + b[0].size, dtype=bool)
        from_b[np.searchsorted(a[0], b[0]) + np.arange(b[0].size)] = True
        out = []
        for x, y in zip(a, b):
            z = np.empty(from_b.size, dtype=x.dtype)
            z[from_b], z[~from_b] = y, x
            out.append(z)
        return tuple(out)


def scan(path: str | Path, prompt_column: str = "prompt", id_column: Optional[str] = None,
         format: Optional[str] = None, options: Optional[dict] = None,
         observe: Optional[Callable[[Row], None]] = None) -> DatasetInfo:
    """One streaming pass that validates the whole dataset; see the module docstring.
    ``observe(row)``: called on every row once its error (if any) is known, so what else needs
    the whole dataset (the audit's sample) is drawn in the same pass. The driver's memory for
    it is SeenIds' 24 bytes a row (and the row errors), whatever the prompts."""
    seen = SeenIds()
    errors: dict[int, str] = {}
    n = 0
    files, root = dataset_files(path, options)  # listed once for the rows, the formats and the fingerprint

    def check(batch: list[Row]) -> None:
        keyed = [r for r in batch if r.prompt_id is not None]
        firsts = dict(zip((r.row for r in keyed), seen.add([r.prompt_id for r in keyed], [r.row for r in keyed])))
        for r in batch:
            if r.prompt_id is None:
                why = f"id column {id_column!r} is null"
            elif firsts[r.row] >= 0:
                why = f"duplicate prompt_id {r.prompt_id!r} (first at row {firsts[r.row]})"
            else:
                why = prompt_problem(r.prompt, prompt_column)
            if why:
                name = PurePosixPath(str(path)).name if r.file is None else ""
                errors[r.row] = r.error = f"{name} {r.where()}: {why}".lstrip()
            if observe is not None:
                observe(r)

    batch: list[Row] = []
    for r in _iter_files(files, root, prompt_column, id_column, format):
        n += 1
        batch.append(r)
        if len(batch) == BATCH_ROWS:
            check(batch)
            batch = []
    check(batch)
    if n == 0:
        raise DatasetError(f"dataset {path}: no rows")
    if errors:
        first = [errors[k] for k in sorted(errors)[:3]]
        log.warning("dataset %s: %d row(s) cannot run and become error rows: %s%s", path, len(errors),
                    "; ".join(first), "; ..." if len(errors) > 3 else "")
    formats = sorted({detect_format(f.path, format) for f in files})
    return DatasetInfo(str(path), "+".join(formats), n, fingerprint(files, root), errors, options)


def iter_shards(info: DatasetInfo, shard_size: int, prompt_column: str = "prompt",
                id_column: Optional[str] = None) -> Iterator[Shard]:
    """Shards of `shard_size` consecutive rows (the last may be shorter), row errors attached."""
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    rows: list[Row] = []
    sid = 0
    for r in iter_rows(info.path, prompt_column, id_column, None if "+" in info.format else info.format, info.options):
        r.error = info.row_errors.get(r.row)
        rows.append(r)
        if len(rows) == shard_size:
            yield Shard(sid, rows[0].row, rows)
            rows, sid = [], sid + 1
    if rows:
        yield Shard(sid, rows[0].row, rows)
