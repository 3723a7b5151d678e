"""Streaming prompt datasets: Parquet, JSONL, CSV, text -> shards of (prompt_id, prompt) rows.

`scan()` reads the whole file once, streaming, before any model loads: it fails on a missing
file, an unknown format, a corrupt file or a missing column (naming the file and the column),
counts the rows, finds duplicate ids and hashes the bytes (for resume); its memory is bounded
whatever the rows (SeenIds spills the ids to a temporary file past SPILL_IDS). `iter_shards()`
then streams the file again and yields one shard of `shard_size` rows at a time, so the driver
holds a few shards, not the dataset; given the shards written already, it does not read the files
(nor the Parquet row groups) that hold only theirs. `write_scan` / `read_scan` keep a scan's
outcome (rows, fingerprint, each file's rows, row errors) with a job's output, so that a resume
reads it there instead of scanning again (cluster/plan.py, cluster/preflight.py).

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

import bisect
import difflib
import hashlib
import io
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Collection, Iterator, Optional

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
    # rows of each file, in the listing's order (None: not known, e.g. from job.json): with them a
    # resume reads only the files (and Parquet row groups) of the shards it runs
    file_rows: Optional[list[int]] = None
    # duplicates found only after ``observe`` saw their rows (a scan past SeenIds' bound spills the
    # ids and finds duplicates across what it spilled at its end): the audit's sample drops them
    late_rows: frozenset = frozenset()
    source: str = "scan"  # scan | checkpoint (read from the output's SCAN_FILE) | job.json

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


def _parquet_batches(path: Location, prompt_col: str, id_col: Optional[str],
                     want: Optional[Callable[[int, int], bool]] = None) -> Iterator[tuple]:
    """``want(lo, hi)``: whether any of the file's rows lo..hi-1 is needed; a row group none of
    whose rows is comes as ``(None, its rows, None)`` (skipped, not read)."""
    try:
        pf = pq.ParquetFile(path.fs.open_input_file(path.path))
        names = pf.schema_arrow.names
    except (pa.ArrowException, OSError) as e:
        raise DatasetError(f"dataset {path}: not a readable Parquet file ({e})") from None
    for col, role in ((prompt_col, "prompt_column"), (id_col, "id_column")):
        if col is not None and col not in names:
            raise _missing(path, col, role, names)
    cols = [prompt_col] + ([id_col] if id_col else [])
    plan: list[tuple[Optional[int], int]] = [(None, 0)]  # (row group, None: all, -1: skipped; its rows)
    if want is not None:
        plan, lo = [], 0
        for g in range(pf.num_row_groups):
            k = pf.metadata.row_group(g).num_rows
            plan.append((g, k) if want(lo, lo + k) else (-1, k))
            lo += k
    n = 0
    try:
        for g, k in plan:
            if g == -1:
                yield None, k, None
                n += k
                continue
            batches = pf.iter_batches(batch_size=BATCH_ROWS, columns=cols, **({} if g is None else {"row_groups": [g]}))
            for batch in batches:
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
                format: Optional[str], want: Optional[Callable[[int, int], bool]] = None,
                file_rows: Optional[list[int]] = None, counted: Optional[list[int]] = None) -> Iterator[Row]:
    """The rows of ``files``, numbered across them. ``want(lo, hi)``: whether any of the rows
    lo..hi-1 is needed: a Parquet row group none of whose rows is is not read, nor (with
    ``file_rows``, each file's rows) a file; the rows of what is read all come. ``counted``:
    each file's rows are appended to it as the file ends."""
    n = 0
    for k, f in enumerate(files):
        fmt = detect_format(f.path, format)
        rel = None if root is None else f.path[len(root.path):].lstrip("/")
        if want is not None and file_rows is not None and not want(n, n + file_rows[k]):
            n += file_rows[k]
            continue
        i = 0
        kw = {"want": lambda lo, hi, at=n: want(at + lo, at + hi)} if want is not None and fmt == "parquet" else {}
        try:
            for prompts, ids, lines in _READERS[fmt](f, prompt_column, id_column, **kw):
                if prompts is None:  # a row group skipped: ``ids`` rows
                    n, i = n + ids, i + ids
                    continue
                for j, prompt in enumerate(prompts):
                    if fmt == "text":  # no columns: a prompt is known by its line
                        pid = str(lines[j]) if rel is None else f"{rel}:{lines[j]}"
                    else:
                        pid = _id_str(ids[j]) if ids is not None else (str(n) if rel is None else f"{rel}:{i}")
                    yield Row(n, pid, prompt, line=lines[j] if lines is not None else None, file=rel, file_row=i)
                    n += 1
                    i += 1
            if counted is not None:
                counted.append(i)
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


SPILL_IDS = 1 << 20  # ids SeenIds holds in memory (24 bytes each: 24 MiB) before it spills them to disk
_CELLS = 1 << 12  # a spilled run's index: where each 1/4096 of the hash range starts in it
_ENTRY = None  # numpy dtype of a spilled entry (hi, lo, row), made on first use


class SeenIds:
    """The ids a scan has seen, 24 bytes an id however long it is: a 128-bit hash (two of
    Python's keyed string hashes, of the id and of the id with a NUL after it) and the row it
    was first seen at, in runs sorted by the first 64 bits that merge as they grow (a
    log-structured set): a batch of ids costs a few binary searches. Two distinct ids share both
    hashes with odds of about n^2 / 2^129 (1e-26 for ten million ids).

    Memory stays bounded however many ids come: past ``bound`` ids the runs are written to a
    temporary file (sorted by hash, with an index of where each 1/4096 of the hash range starts)
    and ``add`` stops answering (every id after that comes back -1: not known yet); ``late()``
    then finds the duplicates among everything written, one slice of the hash range at a time
    (at most ``bound`` entries in memory), as an external sort would. A dataset under ``bound``
    ids never touches the disk and gets every answer from ``add``, as before."""

    def __init__(self, bound: Optional[int] = None):
        import numpy as np

        self._np = np
        self.bound = max(1, int(SPILL_IDS if bound is None else bound))
        self.runs: list[tuple] = []  # (hi sorted, lo, first rows), largest run first
        self.file = None  # the spill file, once the ids pass ``bound``
        self.spilled: list[tuple[int, "np.ndarray"]] = []  # (first entry in the file, cell starts) per run
        self.held = 0  # entries in ``runs``

    def add(self, ids: list[str], rows: list[int]) -> list[int]:
        """For each id, the row of an earlier equal id (this batch included), else -1; the ids
        not seen before are kept. Once spilled: -1 for all, and ``late()`` finds them."""
        np = self._np
        if not ids:
            return []
        hi = np.fromiter(map(hash, ids), dtype=np.int64, count=len(ids))
        lo = np.fromiter((hash(i + "\0") for i in ids), dtype=np.int64, count=len(ids))
        rows_a = np.asarray(rows, dtype=np.int64)
        if self.file is not None:  # spilled: kept unchecked (late() checks), sorted when written
            self.runs.append((hi, lo, rows_a))
            self.held += hi.size
            if self.held >= self.bound:
                self._spill()
            return [-1] * len(ids)
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
        run = (hi[new][order], lo[new][order], rows_a[new][order])
        self.held += run[0].size
        while self.runs and self.runs[-1][0].size <= run[0].size:
            run = self._merge(self.runs.pop(), run)
        self.runs.append(run)
        if self.held >= self.bound:
            self._spill()
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

    def _spill(self) -> None:
        """The runs in memory, sorted by hash as one run, to the end of the spill file."""
        global _ENTRY
        import tempfile

        np = self._np
        if not self.runs:
            return
        if _ENTRY is None:
            _ENTRY = np.dtype([("hi", "<i8"), ("lo", "<i8"), ("row", "<i8")])
        if self.file is None:
            self.file = tempfile.TemporaryFile(prefix="spd_cluster-ids-")
        hi = np.concatenate([r[0] for r in self.runs])
        order = np.argsort(hi, kind="stable")
        entries = np.empty(hi.size, dtype=_ENTRY)
        entries["hi"] = hi[order]
        del hi
        for name, k in (("lo", 1), ("row", 2)):
            entries[name] = np.concatenate([r[k] for r in self.runs])[order]
        del order
        self.runs, self.held = [], 0
        cells = (entries["hi"].view(np.uint64) ^ np.uint64(1 << 63)) >> np.uint64(64 - 12)
        starts = np.searchsorted(cells, np.arange(_CELLS + 1, dtype=np.uint64))
        self.file.seek(0, 2)
        self.spilled.append((self.file.tell() // _ENTRY.itemsize, starts))
        entries.tofile(self.file)

    def late(self) -> dict[int, int]:
        """row -> the row of its first equal id, for the duplicates ``add`` could not answer (none
        unless it spilled). Reads the spill file one slice of the hash range at a time: the
        cells of all runs that together hold at most ``bound`` entries (one cell at least)."""
        np = self._np
        if self.file is None:
            return {}
        self._spill()
        found: dict[int, int] = {}
        counts = sum(np.diff(starts) for _, starts in self.spilled)
        c0 = 0
        while c0 < _CELLS:
            c1, total = c0 + 1, int(counts[c0])
            while c1 < _CELLS and total + int(counts[c1]) <= self.bound:
                total += int(counts[c1])
                c1 += 1
            parts = []
            for at, starts in self.spilled:
                k = int(starts[c1] - starts[c0])
                if k:
                    self.file.seek((at + int(starts[c0])) * _ENTRY.itemsize)
                    parts.append(np.fromfile(self.file, dtype=_ENTRY, count=k))
            c0 = c1
            if sum(p.size for p in parts) < 2:
                continue
            e = np.concatenate(parts)
            del parts
            e = e[np.lexsort((e["row"], e["lo"], e["hi"]))]
            same = (e["hi"][1:] == e["hi"][:-1]) & (e["lo"][1:] == e["lo"][:-1])
            if not same.any():
                continue
            dup = np.flatnonzero(same) + 1
            head = np.maximum.accumulate(np.where(np.r_[True, ~same], np.arange(e.size), 0))
            found.update(zip(e["row"][dup].tolist(), e["row"][head[dup]].tolist()))
        return found

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
            self.spilled = []


def scan(path: str | Path, prompt_column: str = "prompt", id_column: Optional[str] = None,
         format: Optional[str] = None, options: Optional[dict] = None,
         observe: Optional[Callable[[Row], None]] = None, spill_ids: Optional[int] = None) -> DatasetInfo:
    """One streaming pass that validates the whole dataset; see the module docstring.
    ``observe(row)``: called on every row once its error (if any) is known, so what else needs
    the whole dataset (the audit's sample) is drawn in the same pass; past ``spill_ids`` ids a
    duplicate is only found at the end (SeenIds), and is named in the info's ``late_rows``
    (default: SPILL_IDS). The driver's memory for it is bounded (SeenIds holds at most that many ids, 24 bytes each,
    and spills the rest to a temporary file), whatever the rows and the prompts; the row errors
    are kept. Without an id column the ids are row numbers, unique by construction: not checked."""
    seen = SeenIds(SPILL_IDS if spill_ids is None else spill_ids) if id_column else None
    errors: dict[int, str] = {}
    n = 0
    files, root = dataset_files(path, options)  # listed once for the rows, the formats and the fingerprint
    name = PurePosixPath(str(path)).name

    def error(r: Row, why: str) -> str:
        return f"{name if r.file is None else ''} {r.where()}: {why}".lstrip()

    def check(batch: list[Row]) -> None:
        if seen is not None:
            keyed = [r for r in batch if r.prompt_id is not None]
            firsts = dict(zip((r.row for r in keyed), seen.add([r.prompt_id for r in keyed], [r.row for r in keyed])))
        for r in batch:
            if r.prompt_id is None:
                why = f"id column {id_column!r} is null"
            elif seen is not None and firsts[r.row] >= 0:
                why = f"duplicate prompt_id {r.prompt_id!r} (first at row {firsts[r.row]})"
            else:
                why = prompt_problem(r.prompt, prompt_column)
            if why:
                errors[r.row] = r.error = error(r, why)
            if observe is not None:
                observe(r)

    batch: list[Row] = []
    file_rows: list[int] = []
    try:
        for r in _iter_files(files, root, prompt_column, id_column, format, counted=file_rows):
            n += 1
            batch.append(r)
            if len(batch) == BATCH_ROWS:
                check(batch)
                batch = []
        check(batch)
        late = seen.late() if seen is not None else {}
    finally:
        if seen is not None:
            seen.close()
    if n == 0:
        raise DatasetError(f"dataset {path}: no rows")
    if late:  # their rows again, for the messages: only the files (and Parquet row groups) that hold them
        marks = sorted(late)

        def want(lo: int, hi: int) -> bool:
            i = bisect.bisect_left(marks, lo)
            return i < len(marks) and marks[i] < hi

        for r in _iter_files(files, root, prompt_column, id_column, format, want, file_rows):
            if r.row in late:
                errors[r.row] = error(r, f"duplicate prompt_id {r.prompt_id!r} (first at row {late[r.row]})")
    if errors:
        first = [errors[k] for k in sorted(errors)[:3]]
        log.warning("dataset %s: %d row(s) cannot run and become error rows: %s%s", path, len(errors),
                    "; ".join(first), "; ..." if len(errors) > 3 else "")
    formats = sorted({detect_format(f.path, format) for f in files})
    return DatasetInfo(str(path), "+".join(formats), n, fingerprint(files, root), errors, options,
                       file_rows=file_rows, late_rows=frozenset(late))


def iter_shards(info: DatasetInfo, shard_size: int, prompt_column: str = "prompt",
                id_column: Optional[str] = None, skip: Collection[int] = ()) -> Iterator[Shard]:
    """Shards of `shard_size` consecutive rows (the last may be shorter), row errors attached,
    but those in ``skip`` (written already). With the files' row counts (``info.file_rows``) a
    file none of whose rows a shard to run holds is not read, nor such a Parquet row group."""
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    skip = set(skip)
    want = None
    if skip:
        def want(lo: int, hi: int) -> bool:
            return any(s not in skip for s in range(lo // shard_size, (hi - 1) // shard_size + 1)) if hi > lo else False

    files, root = dataset_files(info.path, info.options)
    fmt = None if "+" in info.format else info.format
    file_rows = info.file_rows if info.file_rows is not None and len(info.file_rows) == len(files) else None
    rows: list[Row] = []
    sid = -1
    for r in _iter_files(files, root, prompt_column, id_column, fmt, want, file_rows):
        k = r.row // shard_size
        if k != sid:
            if rows:
                yield Shard(sid, rows[0].row, rows)
            rows, sid = [], k
        if k in skip:
            continue
        r.error = info.row_errors.get(r.row)
        rows.append(r)
    if rows:
        yield Shard(sid, rows[0].row, rows)


# -- a scan's outcome, kept with a job's output (cluster/plan.py writes it, a resume reads it) --

SCAN_FILE = "scan.parquet"  # in a job's output: the dataset as its plan saw it
_SCAN_KEY = b"spd_cluster.scan"


def write_scan(where: Location, info: DatasetInfo, extra: Optional[dict] = None) -> None:
    """``info`` (but its filesystem options, which the config gives) as a Parquet file: one row
    per row error (row, error), the rest as JSON in its metadata with ``extra`` beside it."""
    meta = {"path": info.path, "format": info.format, "num_rows": info.num_rows, "sha256": info.sha256,
            "file_rows": info.file_rows, **(extra or {})}
    errs = sorted(info.row_errors.items())
    table = pa.table({"row": pa.array([k for k, _ in errs], pa.int64()), "error": pa.array([v for _, v in errs], pa.string())})
    table = table.replace_schema_metadata({_SCAN_KEY: json.dumps(meta).encode()})
    fsmod.publish(where, lambda f, tmp: pq.write_table(table, tmp, filesystem=f))


def read_scan(where: Location, options: Optional[dict] = None) -> Optional[tuple[DatasetInfo, dict]]:
    """What ``write_scan`` wrote (the info, with ``options``, and the whole metadata), or None
    when the file is not there or not one of ours."""
    try:
        with where.fs.open_input_file(where.path) as f:
            table = pq.ParquetFile(f).read()
        meta = json.loads((table.schema.metadata or {})[_SCAN_KEY])
        errors = dict(zip(table.column("row").to_pylist(), table.column("error").to_pylist()))
        info = DatasetInfo(str(meta["path"]), str(meta["format"]), int(meta["num_rows"]), str(meta["sha256"]),
                           errors, options, file_rows=meta.get("file_rows"), source="checkpoint")
    except (pa.ArrowException, OSError, KeyError, ValueError, TypeError):
        return None
    return info, meta
