"""The report's first stage: what a job wrote, read as it is found right now (README, "Output").
A job still running (some results, no exec_info.parquet) is fine, as is one that has written
nothing yet. Nothing is computed here: the figures stage (figures.py) does that, with the reduce
rules of engine/reduce.py."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from ..io import results as rio
from ..io.fs import Location, location

RESULT_COLUMNS = ("prompt_id", "shard_id", "pair_id", "finish_reason", "num_generated_tokens", "ttft_s",
                  "num_decode_iterations", "mean_num_accepted_tokens")
_SHARD_NUMERIC = ("pair_id", "wall_s", "busy_s", "audit_s", "e2e_time", "decode_time", "num_generated_tokens", "num_decode_tokens",
                  "num_row_steps", "decode_iterations", "mean_num_accepted_tokens", "num_prompts", "num_errors",
                  "attempts")


@dataclasses.dataclass
class JobData:
    """Everything the report reads from OUT, as found right now."""

    out: Location
    job: Optional[dict]
    results: pd.DataFrame          # RESULT_COLUMNS, one row per prompt written so far
    shards: pd.DataFrame           # one row per finished shard (shards.parquet + result-file records)
    exec_info: Optional[dict]
    audit: Optional[pd.DataFrame]
    notes: list[str]
    records: list[dict] = dataclasses.field(default_factory=list)  # the shard records, by shard id


def _read_table(loc: Location, notes: list[str]) -> Optional[pd.DataFrame]:
    if not loc.is_file():
        return None
    try:
        return pq.read_table(loc.path, filesystem=loc.fs).to_pandas()
    except (pa.ArrowException, OSError) as e:
        notes.append(f"{loc.name} unreadable ({type(e).__name__}); ignored")
        return None


def load_job(out: str | Path | Location) -> JobData:
    """Read a job's output (a directory or a URI). Shard records as a resume reads them
    (io/results.load_records); every results file for the per-prompt figures."""
    out = location(out)
    notes: list[str] = []
    job = rio.read_job_json(out)
    on_disk = rio.written_shards(out)  # one listing, for the records and the rows
    records, stale = rio.load_records(out, on_disk=on_disk)
    for loc in stale:
        notes.append(f"results/{loc.name} unreadable ({'no shard record' if loc.is_file() else 'gone'}); skipped")
    frames = []
    for loc in on_disk.values():
        if loc in stale:
            continue
        try:
            pf = pq.ParquetFile(loc.fs.open_input_file(loc.path))
            frames.append(pf.read(columns=[c for c in RESULT_COLUMNS if c in pf.schema_arrow.names]))
        except (pa.ArrowException, OSError) as e:
            notes.append(f"results/{loc.name} unreadable ({type(e).__name__}); skipped")
    results = pd.DataFrame(columns=list(RESULT_COLUMNS))
    if frames:
        try:
            results = pa.concat_tables(frames, promote_options="default").to_pandas()
        except pa.ArrowException:  # files of differing schemas: combine them in pandas
            results = pd.concat([t.to_pandas() for t in frames], ignore_index=True)
    recs = [{k: v for k, v in r.items() if k != "audit"} for _, r in sorted(records.items())]
    if len(results):  # a record without its token count (an older writer's): the count of its rows
        from_rows = results.groupby("shard_id")["num_generated_tokens"].sum()
        for r in recs:
            if not r.get("num_generated_tokens") and int(r["shard_id"]) in from_rows.index:
                r["num_generated_tokens"] = int(from_rows[int(r["shard_id"])])
    shards = pd.DataFrame(recs)
    if len(shards):
        shards = shards.sort_values("shard_id", kind="stable").reset_index(drop=True)
        for c in _SHARD_NUMERIC:
            if c in shards:
                shards[c] = pd.to_numeric(shards[c], errors="coerce")
    ei = _read_table(out / "exec_info.parquet", notes)
    exec_info = ei.iloc[0].to_dict() if ei is not None and len(ei) else None
    audit = _read_table(out / "audit.parquet", notes)
    if job is None:
        notes.append("job.json not found: settings from exec_info.parquet only" if exec_info else "job.json not found")
    return JobData(out, job, results, shards, exec_info, audit, notes, recs)
