"""Job output (pyarrow), local or anywhere ``pyarrow.fs`` reaches (io/fs.py): every file is
written under a temporary name and then published under its own, so a reader sees the old file
or the new one, never half of one, on object storage too.

    OUT/results/shard-NNNNN.parquet   one row per prompt (RESULTS_SCHEMA), written by the pair that
                                      ran the shard; the shard's record (a SHARDS_SCHEMA row) rides
                                      along as JSON in the file's metadata (key b"spd_cluster.shard")
    OUT/shards.parquet                one row per shard: placement, attempts, timing, SpDPerfMetrics;
                                      rewritten while the job runs (a checkpoint) and at its end
    OUT/exec_info.parquet             one row: the aggregate CloudAI100ExecInfo's metrics + settings
                                      (+ audit_num_prompts, audit_match_rate, audit_speedup); the
                                      per-prompt lists are not in it (results/ has them by prompt_id)
    OUT/audit.parquet                 one row per audited prompt (AUDIT_SCHEMA; cluster/audit.py)
    OUT/scan.parquet                  the dataset as the plan's scan saw it (io/dataset.py SCAN_FILE):
                                      what a resume reads instead of scanning again
    OUT/job.json                      resolved config, versions, status, times

Every column has its unit and a one-line description in the Parquet field metadata (``col``).

What a resume, `status` and `report` read of the shards (``load_records``): shards.parquet, one
listing of results/, and the footers of only the shard files shards.parquet does not yet hold,
so reading a large job's state costs a few requests, not one per shard.
"""

from __future__ import annotations

import dataclasses
import json
import os
import uuid
from pathlib import Path, PurePosixPath
from typing import Any, Iterable, Optional

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from ..engine.metrics import SpDPerfMetrics
from . import fs as fsmod
from .fs import Location

SHARD_META_KEY = b"spd_cluster.shard"

def col(name: str, type_: pa.DataType, unit: str, doc: str) -> pa.Field:
    """A column with its unit and one-line description in the field metadata, which Parquet keeps:
    ``pq.read_schema(path).field(name).metadata`` -> {b"unit": ..., b"description": ...}. Every
    column of every file below is defined once, here (SpDPerfMetrics' in engine/metrics.py)."""
    return pa.field(name, type_, metadata={b"unit": unit.encode(), b"description": doc.encode()})


RESULTS_SCHEMA = pa.schema([
    col("prompt_id", pa.string(), "", "the id column's value as text, or the row number; joins audit.parquet"),
    col("row", pa.int64(), "", "0-based row number in the dataset"),
    col("prompt", pa.string(), "", "the prompt (non-string values as their repr)"),
    col("generated_text", pa.string(), "", "decoded output (special tokens skipped)"),
    col("generated_ids", pa.list_(pa.int64()), "", "generated token ids, the prefill token included"),
    col("num_prompt_tokens", pa.int64(), "tokens", "prompt length in tokens"),
    col("num_generated_tokens", pa.int64(), "tokens", "len(generated_ids)"),
    col("finish_reason", pa.string(), "", "eos | length | ctx_len | error"),
    col("error", pa.string(), "", "null, or why the row failed"),
    col("shard_id", pa.int64(), "", "the shard the row ran in (shards.parquet)"),
    col("pair_id", pa.int64(), "", "the pair that ran it"),
    col("ttft_s", pa.float64(), "s", "seconds from the prompt's prefill start to its first token"),
    col("num_decode_iterations", pa.int64(), "count", "speculative steps of this prompt"),
    col("num_accepted_tokens", pa.int64(), "tokens",
        "tokens per step summed over this prompt's steps (accepted proposals + the target's own)"),
    col("mean_num_accepted_tokens", pa.float64(), "tokens",
        "num_accepted_tokens / num_decode_iterations: this prompt's tokens per step"),
])

_ARROW_OF = {"float": pa.float64(), "int": pa.int64(), "list[int]": pa.list_(pa.int64()),
             "list[float]": pa.list_(pa.float64()), "str": pa.string(), "bool": pa.bool_(),
             "Optional[int]": pa.int64(), "Optional[str]": pa.string(), "Optional[float]": pa.float64()}


def _metric_fields() -> list[pa.Field]:
    """SpDPerfMetrics' fields as columns, units and descriptions from the dataclass; the
    per-prompt lists are left out (they are per prompt_id in results/*.parquet)."""
    out = []
    for f in dataclasses.fields(SpDPerfMetrics):
        if f.metadata.get("per_prompt"):
            continue
        ann = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        out.append(col(f.name, _ARROW_OF.get(ann.replace("typing.", ""), pa.string()), f.metadata.get("unit", ""),
                       f.metadata.get("doc", "")))
    return out


METRIC_FIELDS = _metric_fields() + [col("acceptance_rate_per_position", pa.list_(pa.float64()), "",
                                        "accepted_per_position / proposed_per_position, position by position")]

SHARDS_SCHEMA = pa.schema([
    col("shard_id", pa.int64(), "", "shard number; results/shard-NNNNN.parquet holds its rows"),
    col("first_row", pa.int64(), "", "0-based dataset row of the shard's first prompt"),
    col("num_prompts", pa.int64(), "count", "rows in the shard, error rows included"),
    col("num_errors", pa.int64(), "count", "rows with finish_reason error"),
    col("pair_id", pa.int64(), "", "the pair that ran it"),
    col("node_id", pa.string(), "", "Ray node id of the pair's target actor"),
    col("attempts", pa.int64(), "count", "1 unless the shard was re-run after an actor/node death"),
    col("wall_s", pa.float64(), "s", "the pair's seconds on the shard: its run, the audit's re-runs, writing its file"),
    col("audit_s", pa.float64(), "s", "seconds the pair spent re-running the shard's audited prompts (0: none)"),
    col("busy_s", pa.float64(), "s", "wall_s - audit_s: the pair's busy seconds for the shard itself"),
    col("finished_at", pa.string(), "", "UTC time (ISO 8601, whole seconds) the pair wrote the shard's file"),
    col("first_error", pa.string(), "", "the shard's first error row (prompt id: error), null when none"),
    *METRIC_FIELDS,
])

EXEC_INFO_SCHEMA = pa.schema([
    col("name", pa.string(), "", "job name"),
    col("mode", pa.string(), "", "baseline | draft | pld | multiproj"),
    col("target_model_name", pa.string(), "", "target model"),
    col("draft_model_name", pa.string(), "", "draft model (draft mode), else empty"),
    col("num_speculative_tokens", pa.int64(), "tokens", "k: proposals per step"),
    col("prefill_seq_len", pa.int64(), "tokens", "prefill chunk length"),
    col("ctx_len", pa.int64(), "tokens", "context length of a slot"),
    col("full_batch_size", pa.int64(), "count", "slots per session"),
    col("prefill_bsz", pa.int64(), "count", "prefill batch size (always 1)"),
    col("batch_size", pa.int64(), "count", "the seed's batch_size (= full_batch_size)"),
    col("num_prompts", pa.int64(), "count", "rows in the dataset"),
    col("num_errors", pa.int64(), "count", "rows with finish_reason error"),
    col("num_shards", pa.int64(), "count", "shards of the dataset"),
    col("num_pairs", pa.int64(), "count", "distinct pair ids that ran the written shards (from the shard records)"),
    col("num_pairs_configured", pa.int64(), "count", "cluster.num_pairs of the run that wrote this file"),
    col("actor_startup_s", pa.float64(), "s",
        "seconds from each run's start to its first shard dispatch (Ray, placement, model loading), summed over runs"),
    col("audit_time_s", pa.float64(), "s", "pair-seconds spent in the audit's re-runs, summed over shards"),
    col("audit_wall_time_s", pa.float64(), "s",
        "the audit's share of the job wall time, left out of e2e_time: (wall - actor_startup_s) * audit / shard seconds"),
    *METRIC_FIELDS,
    col("audit_num_prompts", pa.int64(), "count", "prompts audited"),
    col("audit_match_rate", pa.float64(), "",
        "fraction of audited prompts token-identical to the target alone; null: no audit, or sampling"),
    col("audit_speedup", pa.float64(), "", "mean baseline time per token / mean SpD time per token (x)"),
])

AUDIT_SCHEMA = pa.schema([
    col("prompt_id", pa.string(), "", "the audited prompt; joins results/*.parquet"),
    col("row", pa.int64(), "", "0-based row number in the dataset"),
    col("shard_id", pa.int64(), "", "the shard it ran in"),
    col("pair_id", pa.int64(), "", "the pair that ran it and its audit"),
    col("match", pa.bool_(), "", "the job's output == the target alone's; null with sampling or an error"),
    col("first_diff_position", pa.int64(), "tokens", "first index where the outputs differ; null when they match"),
    col("spd_token", pa.int64(), "", "the job's token there (-1: its output ended first)"),
    col("baseline_token", pa.int64(), "", "the baseline's token there (-1: its output ended first)"),
    col("spd_num_tokens", pa.int64(), "tokens", "tokens the job generated for the prompt"),
    col("baseline_num_tokens", pa.int64(), "tokens", "tokens the baseline generated for it"),
    col("spd_time_per_token_s", pa.float64(), "s", "timed SpD re-run: seconds prefill start to last token / tokens"),
    col("baseline_time_per_token_s", pa.float64(), "s", "timed baseline re-run: seconds prefill start to last token / tokens"),
    col("spd_tokens_per_step", pa.float64(), "tokens",
        "tokens per step of the timed SpD re-runs: the most their speedup can be (cluster/audit.py)"),
    col("error", pa.string(), "", "null, or why the prompt could not be compared"),
])


_PER_PROMPT = {f.name for f in dataclasses.fields(SpDPerfMetrics) if f.metadata.get("per_prompt")}


def metrics_record(m: SpDPerfMetrics) -> dict[str, Any]:
    """A shard's (or the job's) metrics as a record: every SpDPerfMetrics field but the per-prompt
    lists, which the result rows hold by prompt_id."""
    d = {k: v for k, v in dataclasses.asdict(m).items() if k not in _PER_PROMPT}
    d["acceptance_rate_per_position"] = m.acceptance_rate_per_position
    return d


# -- writing and reading whole files ---------------------------------------------------------

Where = "str | os.PathLike | Location"


def _loc(where, options: Optional[dict] = None) -> Location:
    return fsmod.location(where, options)


def write_parquet_atomic(table: pa.Table, where: Where) -> Location:
    loc = _loc(where)
    fsmod.publish(loc, lambda f, tmp: pq.write_table(table, tmp, filesystem=f))
    return loc


def write_json_atomic(obj: Any, where: Where) -> Location:
    loc = _loc(where)
    fsmod.write_bytes(loc, (json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n").encode())
    return loc


def table_from_records(records: Iterable[dict], schema: pa.Schema) -> pa.Table:
    records = list(records)
    cols = {f.name: [r.get(f.name) for r in records] for f in schema}
    return pa.Table.from_pydict(cols, schema=schema)


def _read_table(loc: Location) -> Optional[pa.Table]:
    """A whole Parquet file, or None when it is not there or unreadable."""
    try:  # one file: ParquetFile, not read_table (which goes through pyarrow.dataset, and that imports pandas)
        with loc.fs.open_input_file(loc.path) as f:
            return pq.ParquetFile(f).read()
    except (pa.ArrowException, OSError):
        return None


# -- the files -------------------------------------------------------------------------------

def results_dir(out: Where) -> Location:
    return _loc(out) / "results"


def shard_path(out: Where, shard_id: int) -> Location:
    return results_dir(out) / f"shard-{shard_id:05d}.parquet"


def write_shard(out: Where, shard_id: int, rows: list[dict], shard_record: dict) -> Location:
    """Write one shard's rows; ``shard_record`` (a SHARDS_SCHEMA row) goes into the file metadata.
    A shard run twice (its first pair died after writing) replaces its file whole: still one
    file, one row per prompt."""
    table = table_from_records(rows, RESULTS_SCHEMA)
    meta = {SHARD_META_KEY: json.dumps(shard_record, default=str).encode()}
    return write_parquet_atomic(table.replace_schema_metadata(meta), shard_path(out, shard_id))


def read_shard_record(where: Where) -> Optional[dict]:
    """The shard record stored in a results file, or None if the file is unreadable or foreign."""
    loc = _loc(where)
    try:
        meta = pq.read_schema(loc.path, filesystem=loc.fs).metadata or {}
    except (pa.ArrowException, OSError):
        return None
    raw = meta.get(SHARD_META_KEY)
    try:
        rec = json.loads(raw) if raw else None
    except ValueError:
        return None
    return rec if isinstance(rec, dict) else None


def written_shards(out: Where) -> dict[int, Location]:
    """shard id -> its results file, from one listing of OUT/results."""
    d = results_dir(out)
    infos = d.fs.get_file_info(pafs.FileSelector(d.path, allow_not_found=True))
    found = {}
    for i in infos:
        name = PurePosixPath(i.path).name
        if i.type == pafs.FileType.File and name.startswith("shard-") and name.endswith(".parquet"):
            try:
                found[int(name[len("shard-"):-len(".parquet")])] = d / name
            except ValueError:
                continue
    return found


def write_shards_table(out: Where, records: list[dict]) -> Location:
    records = sorted(records, key=lambda r: r["shard_id"])
    return write_parquet_atomic(table_from_records(records, SHARDS_SCHEMA), _loc(out) / "shards.parquet")


def read_shards_table(out: Where) -> list[dict]:
    """The records shards.parquet holds (none when it is not there or unreadable)."""
    t = _read_table(_loc(out) / "shards.parquet")
    if t is None:
        return []
    names = set(SHARDS_SCHEMA.names)
    return [{k: v for k, v in r.items() if k in names} for r in t.to_pylist()]


def read_audit(out: Where) -> list[dict]:
    t = _read_table(_loc(out) / "audit.parquet")
    return [] if t is None else t.to_pylist()


def load_records(out: Where, with_audit: bool = False,
                 on_disk: Optional[dict[int, Location]] = None) -> tuple[dict[int, dict], list[Location]]:
    """The records of the shards written in OUT, by shard id, and the shard files that are
    unreadable or foreign. shards.parquet (the checkpoint) gives the records of the files it
    names; only the files it does not name have their footers read. ``with_audit``: each
    record's ``audit`` rows too (audit.parquet for the checkpoint's shards, written before it).
    ``on_disk``: written_shards(out), when the caller has listed it already."""
    on_disk = written_shards(out) if on_disk is None else on_disk
    known = {int(r["shard_id"]): r for r in read_shards_table(out) if int(r["shard_id"]) in on_disk}
    if with_audit and known:
        by_shard: dict[int, list] = {}
        for a in read_audit(out):
            by_shard.setdefault(int(a["shard_id"]), []).append(a)
        for sid, r in known.items():
            r["audit"] = by_shard.get(sid, [])
    stale = []
    for sid, loc in sorted(on_disk.items()):
        if sid in known:
            continue
        rec = read_shard_record(loc)
        if rec is None or int(rec.get("shard_id", -1)) != sid:
            stale.append(loc)
        else:
            known[sid] = rec
    return dict(sorted(known.items())), stale


def write_audit(out: Where, rows: list[dict]) -> Location:
    rows = sorted(rows, key=lambda r: (r["row"] is None, r["row"] or 0))
    return write_parquet_atomic(table_from_records(rows, AUDIT_SCHEMA), _loc(out) / "audit.parquet")


def write_exec_info(out: Where, record: dict) -> Location:
    return write_parquet_atomic(table_from_records([record], EXEC_INFO_SCHEMA), _loc(out) / "exec_info.parquet")


def job_json_path(out: Where) -> Location:
    return _loc(out) / "job.json"


def read_job_json(out: Where) -> Optional[dict]:
    try:
        return json.loads(fsmod.read_bytes(job_json_path(out)))
    except (OSError, ValueError):
        return None


def write_job_json(out: Where, info: dict) -> Location:
    return write_json_atomic(info, job_json_path(out))


class JobFile:
    """job.json of the job this driver runs: ``data`` is the dict, ``run`` its entry in ``runs``.
    A thread rewrites it every ``every_s`` with ``heartbeat_at`` (epoch seconds) and the fields
    ``progress()`` returns for the current run, so `spd-cluster status` can tell a live driver
    from a killed one and a killed run still leaves its wall time (see spd_cluster/status.py)."""

    def __init__(self, out: Where, data: dict, every_s: float = 5.0):
        import threading

        self.out, self.data, self.every_s = _loc(out), data, every_s
        self.run: dict = data["runs"][-1]
        self.progress = lambda: {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def write(self, **fields) -> None:
        import time

        with self._lock:
            self.data.update(fields)
            self.run.update(self.progress())
            self.data["heartbeat_at"] = round(time.time(), 3)
            write_job_json(self.out, self.data)

    def start_heartbeat(self) -> None:
        import threading

        def beat():
            while not self._stop.wait(self.every_s):
                try:
                    self.write()
                except OSError:  # a full disk or a lost mount: the next beat tries again
                    pass

        self._thread = threading.Thread(target=beat, name="spd_cluster-heartbeat", daemon=True)
        self._thread.start()

    def stop_heartbeat(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)


class OutputError(ValueError):
    """The output path cannot take this job."""


def check_writable(out: Where, options: Optional[dict] = None) -> Location:
    """Create OUT (locally) and prove a file can be published there; raise OutputError at once."""
    try:
        loc = _loc(out, options)
    except ValueError as e:
        raise OutputError(f"output path {e}") from None
    try:
        if loc.local:
            Path(loc.path, "results").mkdir(parents=True, exist_ok=True)
        probe = loc / f".write-test-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        fsmod.write_bytes(probe, b"")
        fsmod.delete(probe)
    except OSError as e:
        raise OutputError(f"output path {loc} is not writable: {getattr(e, 'strerror', None) or e}") from None
    return loc


OUR_FILES = ("shards.parquet", "exec_info.parquet", "audit.parquet", "job.json")


def remove_temporaries(out: Where) -> int:
    """The temporary files of writers killed mid-write (a pair, a driver), in OUT and OUT/results."""
    loc = _loc(out)
    return fsmod.remove_temporaries(loc) + fsmod.remove_temporaries(results_dir(loc))


def clear_output(out: Where) -> None:
    """Remove what a previous job wrote here (only our files; anything else is left alone)."""
    loc = _loc(out)
    for p in written_shards(loc).values():
        fsmod.delete(p)
    for name in OUR_FILES:
        fsmod.delete(loc / name)


# -- a shard's rows and record, as the pair that ran it writes them ----------------------------

def _prompt_text(p: Any) -> Optional[str]:
    return p if p is None or isinstance(p, str) else repr(p)


def result_rows(shard, engine_rows: list[dict], pair_id: int) -> list[dict]:
    """A shard's RESULTS_SCHEMA rows in dataset order: the rows the driver rejected
    (``row.error``) in place, the engine's rows (one per runnable row, in order) for the rest."""
    it = iter(engine_rows)
    rows = []
    for r in shard.rows:
        row = {"prompt_id": r.prompt_id, "row": r.row, "prompt": _prompt_text(r.prompt),
               "shard_id": shard.shard_id, "pair_id": pair_id}
        if r.error is not None:
            row.update(generated_text="", generated_ids=[], num_prompt_tokens=0, num_generated_tokens=0,
                       finish_reason="error", error=r.error, ttft_s=0.0, num_decode_iterations=0,
                       num_accepted_tokens=0, mean_num_accepted_tokens=0.0)
        else:
            e = dict(next(it))
            e.pop("prompt_id", None)
            row.update(e)
        rows.append(row)
    return rows


def shard_record(shard, rows: list[dict], metrics: SpDPerfMetrics, **fields) -> dict:
    """The record of a shard (SHARDS_SCHEMA, plus its ``audit`` rows when given in ``fields``)
    from its result rows and metrics; ``fields``: pair_id, node_id, attempts, wall_s, audit_s, ..."""
    from datetime import datetime, timezone

    bad = next((r for r in rows if r["finish_reason"] == "error"), None)
    rec = {"shard_id": shard.shard_id, "first_row": shard.first_row, "num_prompts": len(rows),
           "num_errors": sum(r["finish_reason"] == "error" for r in rows),
           "first_error": None if bad is None else f"{bad['prompt_id']!r}: {bad['error']}",
           "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), **fields,
           **metrics_record(metrics)}
    rec["busy_s"] = max(float(rec.get("wall_s") or 0.0) - float(rec.get("audit_s") or 0.0), 0.0)
    return rec
