"""Job output on disk (pyarrow), every file written to a temp name and renamed into place, so a
reader sees the old file or the new one, never half of one.

    OUT/results/shard-NNNNN.parquet   one row per prompt (RESULTS_SCHEMA); the shard's
                                      SpDPerfMetrics ride along as JSON in the file's metadata
                                      (key b"spd_cluster.shard"), which is what resume reads
    OUT/shards.parquet                one row per shard: placement, attempts, SpDPerfMetrics
    OUT/exec_info.parquet             one row: the aggregate CloudAI100ExecInfo's metrics + settings
                                      (+ audit_num_prompts, audit_match_rate, audit_speedup)
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

RESULTS_SCHEMA = pa.schema([
    ("prompt_id", pa.string()),
    ("row", pa.int64()),  # 0-based row number in the dataset
    ("prompt", pa.string()),
    ("generated_text", pa.string()),
    ("generated_ids", pa.list_(pa.int64())),
    ("num_prompt_tokens", pa.int64()),
    ("num_generated_tokens", pa.int64()),
    ("finish_reason", pa.string()),  # eos | length | ctx_len | error
    ("error", pa.string()),
    ("shard_id", pa.int64()),
    ("pair_id", pa.int64()),
    ("ttft_s", pa.float64()),
    ("num_decode_iterations", pa.int64()),
    ("mean_num_accepted_tokens", pa.float64()),
])

_ARROW_OF = {"float": pa.float64(), "int": pa.int64(), "list[int]": pa.list_(pa.int64()),
             "list[float]": pa.list_(pa.float64()), "str": pa.string(), "bool": pa.bool_(),
             "Optional[int]": pa.int64(), "Optional[str]": pa.string(), "Optional[float]": pa.float64()}


def _metric_fields() -> list[pa.Field]:
    out = []
    for f in dataclasses.fields(SpDPerfMetrics):
        ann = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        out.append(pa.field(f.name, _ARROW_OF.get(ann.replace("typing.", ""), pa.string())))
    return out


METRIC_FIELDS = _metric_fields() + [pa.field("acceptance_rate_per_position", pa.list_(pa.float64()))]

SHARDS_SCHEMA = pa.schema([
    ("shard_id", pa.int64()),
    ("first_row", pa.int64()),
    ("num_prompts", pa.int64()),
    ("num_errors", pa.int64()),
    ("pair_id", pa.int64()),
    ("node_id", pa.string()),
    ("attempts", pa.int64()),  # 1 unless the shard was re-run after an actor/node death
    ("wall_s", pa.float64()),  # driver-side seconds from dispatch to result
    ("finished_at", pa.string()),
    *METRIC_FIELDS,
])

EXEC_INFO_SCHEMA = pa.schema([
    ("name", pa.string()),
    ("mode", pa.string()),
    ("target_model_name", pa.string()),
    ("draft_model_name", pa.string()),
    ("num_speculative_tokens", pa.int64()),
    ("prefill_seq_len", pa.int64()),
    ("ctx_len", pa.int64()),
    ("full_batch_size", pa.int64()),
    ("prefill_bsz", pa.int64()),
    ("batch_size", pa.int64()),
    ("num_prompts", pa.int64()),
    ("num_errors", pa.int64()),
    ("num_shards", pa.int64()),
    ("num_pairs", pa.int64()),
    *METRIC_FIELDS,
    ("audit_num_prompts", pa.int64()),
    ("audit_match_rate", pa.float64()),  # null: no audit, or sampling (not comparable token by token)
    ("audit_speedup", pa.float64()),
])

AUDIT_SCHEMA = pa.schema([
    ("prompt_id", pa.string()),
    ("row", pa.int64()),
    ("shard_id", pa.int64()),
    ("pair_id", pa.int64()),
    ("match", pa.bool_()),  # the job's output == the target alone's; null with sampling or an error
    ("first_diff_position", pa.int64()),  # null when they match
    ("spd_token", pa.int64()),  # the job's token there (-1: its output ended first)
    ("baseline_token", pa.int64()),  # the baseline's token there (-1: its output ended first)
    ("spd_num_tokens", pa.int64()),
    ("baseline_num_tokens", pa.int64()),
    ("spd_time_per_token_s", pa.float64()),
    ("baseline_time_per_token_s", pa.float64()),
    ("error", pa.string()),
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
