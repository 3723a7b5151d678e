"""Job output on disk (pyarrow), every file written to a temp name and renamed into place, so a
reader sees the old file or the new one, never half of one.

    OUT/results/shard-NNNNN.parquet   one row per prompt (RESULTS_SCHEMA); the shard's
                                      SpDPerfMetrics ride along as JSON in the file's metadata
                                      (key b"spd_cluster.shard"), which is what resume reads
    OUT/shards.parquet                one row per shard: placement, attempts, timing, SpDPerfMetrics
    OUT/exec_info.parquet             one row: the aggregate CloudAI100ExecInfo's metrics + settings
                                      (+ audit_num_prompts, audit_match_rate, audit_speedup); the
                                      per-prompt lists are not in it (results/ has them by prompt_id)

Every column has its unit and a one-line description in the Parquet field metadata (``col``).
    OUT/audit.parquet                 one row per audited prompt (AUDIT_SCHEMA; cluster/audit.py)
    OUT/job.json                      resolved config, versions, status, times
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import uuid
from pathlib import Path
from typing import Any, Iterable, Optional

import pyarrow as pa
import pyarrow.parquet as pq

from ..engine.metrics import SpDPerfMetrics

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
    col("wall_s", pa.float64(), "s", "driver-side seconds from dispatch to result, the audit's re-runs included"),
    col("audit_s", pa.float64(), "s", "seconds the pair spent re-running the shard's audited prompts (0: none)"),
    col("busy_s", pa.float64(), "s", "wall_s - audit_s: the pair's busy seconds for the shard itself"),
    col("finished_at", pa.string(), "", "UTC time (ISO 8601, whole seconds) the driver got the result"),
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
    col("error", pa.string(), "", "null, or why the prompt could not be compared"),
])


def metrics_record(m: SpDPerfMetrics) -> dict[str, Any]:
    d = dataclasses.asdict(m)
    d["acceptance_rate_per_position"] = m.acceptance_rate_per_position
    return d


# -- atomic writes ---------------------------------------------------------------------------

def _temp_near(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


def write_parquet_atomic(table: pa.Table, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_near(path)
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_json_atomic(obj: Any, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_near(path)
    try:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def table_from_records(records: Iterable[dict], schema: pa.Schema) -> pa.Table:
    records = list(records)
    cols = {f.name: [r.get(f.name) for r in records] for f in schema}
    return pa.Table.from_pydict(cols, schema=schema)


# -- the files -------------------------------------------------------------------------------

def results_dir(out: str | Path) -> Path:
    return Path(out) / "results"


def shard_path(out: str | Path, shard_id: int) -> Path:
    return results_dir(out) / f"shard-{shard_id:05d}.parquet"


def write_shard(out: str | Path, shard_id: int, rows: list[dict], shard_record: dict) -> Path:
    """Write one shard's rows; `shard_record` (a SHARDS_SCHEMA row) goes into the file metadata."""
    table = table_from_records(rows, RESULTS_SCHEMA)
    meta = {SHARD_META_KEY: json.dumps(shard_record, default=str).encode()}
    table = table.replace_schema_metadata(meta)
    return write_parquet_atomic(table, shard_path(out, shard_id))


def read_shard_record(path: str | Path) -> Optional[dict]:
    """The shard record stored in a results file, or None if the file is unreadable or foreign."""
    try:
        meta = pq.read_schema(path).metadata or {}
    except (pa.ArrowException, OSError):
        return None
    raw = meta.get(SHARD_META_KEY)
    return json.loads(raw) if raw else None


def written_shards(out: str | Path) -> dict[int, Path]:
    d = results_dir(out)
    found = {}
    if d.is_dir():
        for p in d.glob("shard-*.parquet"):
            try:
                found[int(p.stem.split("-", 1)[1])] = p
            except ValueError:
                continue
    return found


def write_shards_table(out: str | Path, records: list[dict]) -> Path:
    records = sorted(records, key=lambda r: r["shard_id"])
    return write_parquet_atomic(table_from_records(records, SHARDS_SCHEMA), Path(out) / "shards.parquet")


def write_audit(out: str | Path, rows: list[dict]) -> Path:
    rows = sorted(rows, key=lambda r: (r["row"] is None, r["row"] or 0))
    return write_parquet_atomic(table_from_records(rows, AUDIT_SCHEMA), Path(out) / "audit.parquet")


def write_exec_info(out: str | Path, record: dict) -> Path:
    return write_parquet_atomic(table_from_records([record], EXEC_INFO_SCHEMA), Path(out) / "exec_info.parquet")


def job_json_path(out: str | Path) -> Path:
    return Path(out) / "job.json"


def read_job_json(out: str | Path) -> Optional[dict]:
    p = job_json_path(out)
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def write_job_json(out: str | Path, info: dict) -> Path:
    return write_json_atomic(info, job_json_path(out))


class JobFile:
    """job.json of the job this driver runs: ``data`` is the dict, ``run`` its entry in ``runs``.
    A thread rewrites it every ``every_s`` with ``heartbeat_at`` (epoch seconds) and the fields
    ``progress()`` returns for the current run, so `spd-cluster status` can tell a live driver
    from a killed one and a killed run still leaves its wall time (see spd_cluster/status.py)."""

    def __init__(self, out: str | Path, data: dict, every_s: float = 5.0):
        import threading

        self.out, self.data, self.every_s = Path(out), data, every_s
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


def check_writable(out: str | Path) -> Path:
    """Create OUT and prove a file can be written and renamed there; raise OutputError at once."""
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        results_dir(out).mkdir(exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=".write-test.", dir=out)
        os.close(fd)
        os.replace(name, name + ".renamed")
        os.unlink(name + ".renamed")
    except OSError as e:
        raise OutputError(f"output path {out} is not writable: {e.strerror or e}") from None
    return out


OUR_FILES = ("shards.parquet", "exec_info.parquet", "audit.parquet", "job.json")


def clear_output(out: str | Path) -> None:
    """Remove what a previous job wrote here (only our files; anything else is left alone)."""
    out = Path(out)
    for p in written_shards(out).values():
        p.unlink(missing_ok=True)
    for name in OUR_FILES:
        (out / name).unlink(missing_ok=True)
