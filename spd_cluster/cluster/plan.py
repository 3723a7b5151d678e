"""Stage 2 of a job's way, plan: which shards this run runs, and what it continues.

In: the preflight (cluster/preflight.py): the dataset's DatasetInfo (scanned, or for a resume
read from the output's scan.parquet, which this stage writes after a scan), the output's
OutputState (the shards already written, read from the checkpoint: shards.parquet names them,
only the files written after it have their footers read) and the audit's sample. Out: ``Plan``:
the shards to run (a lazy iterator over the dataset that does not read the files or Parquet row
groups of the written ones), the audit's picks per shard (from the sample, or from scan.parquet),
the runs this one continues. ``plan`` also makes the output ready: it clears it (overwrite, or a
job that wrote no shard) and drops unreadable shard files, which the run then writes again.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterator, Optional

from ..config import JobConfig
from .preflight import OutputState, Preflight, inspect_output

if TYPE_CHECKING:
    from ..io.dataset import DatasetInfo, Shard
    from ..io.fs import Location

log = logging.getLogger("spd_cluster.cluster")


@dataclass
class Plan:
    cfg: JobConfig
    info: "DatasetInfo"
    out: "Location"
    ident: str  # the output's identity (config and dataset)
    shard_size: int
    num_shards: int
    records: dict[int, dict]  # shard id -> record of the shards already written (skipped); never changed:
    # the commit stage keeps the run's records in a copy
    prev: dict  # the job.json this run continues, or {}
    runs: list[dict] = field(default_factory=list)  # the runs it continues, each with its wall time
    audit_picks: dict[int, list[int]] = field(default_factory=dict)  # shard id -> rows the audit re-runs

    @property
    def skipped(self) -> int:
        """Shards already written when the run starts (resume skips them)."""
        return len(self.records)

    @property
    def todo(self) -> int:
        """Shards this run runs."""
        return self.num_shards - len(self.records)

    @property
    def prior_wall_s(self) -> float:
        return sum(float(r.get("wall_s") or 0.0) for r in self.runs)

    def shards(self) -> Iterator["Shard"]:
        """The shards still to run, in order, read from the dataset as they are sent."""
        from ..io.dataset import iter_shards

        ds = self.cfg.dataset
        return iter_shards(self.info, self.shard_size, ds.prompt_column, ds.id_column, skip=set(self.records))


def prepare_output(out: "Location", cfg: JobConfig, ident: str, dataset_sha: str, num_shards: int,
                   state: Optional[OutputState] = None) -> tuple[dict, dict]:
    """Check an existing output against this job (inspect_output, unless ``state`` is given) and
    make it ready: clear it (overwrite, or a job that wrote no shard), drop unreadable shard
    files. Returns (records of shards already written, the previous job.json or {})."""
    from ..io import fs as fsmod
    from ..io import results as rio
    from ..io.dataset import SCAN_FILE

    state = state or inspect_output(out, cfg, ident, dataset_sha, num_shards)
    rio.remove_temporaries(out)  # of writers killed mid-write in an earlier run
    if state.clear:
        rio.clear_output(out)
        fsmod.delete(out / SCAN_FILE)
    for path in state.stale:
        log.warning("re-running shard file %s: unreadable, or not a shard of this job", path)
        fsmod.delete(path)
    return state.records, state.prev


def prior_runs(prev: dict) -> list[dict]:
    """The runs a resumed job continues, each with its wall time. A job.json written before runs
    kept theirs has the total only: it goes on the last of them."""
    runs = [dict(r) for r in prev.get("runs", [])]
    if runs and not any("wall_s" in r for r in runs):
        runs[-1]["wall_s"] = float(prev.get("wall_time_s") or 0.0)
    for r in runs:
        if r.get("status") == "running":  # its driver died without a word (SIGKILL, a lost node)
            r["status"] = "interrupted"
    return runs


def plan(pf: Preflight) -> Plan:
    """The stage's entry point (after ``preflight(cfg, for_run=True)`` passed). A dataset the
    preflight scanned is saved with the output (SCAN_FILE: rows, fingerprint, each file's rows,
    row errors, the audit's picks), so that a resume reads it instead of the dataset; a plan the
    preflight read from there takes its audit's picks from there."""
    from ..io.dataset import SCAN_FILE, read_scan, write_scan

    cfg, info = pf.cfg, pf.info
    out = pf.out
    records, prev = prepare_output(out, cfg, pf.ident, info.sha256, pf.num_shards, pf.output)
    picks: dict[int, list[int]] = {}
    if pf.sample is not None:
        a = cfg.audit
        if info.late_rows:  # duplicates found after the sample saw them: never audited (the scan's error rows)
            _drop_rows(pf.sample, info.late_rows)
        picks = pf.sample.picks(a.fraction, a.min_prompts, info.num_rows - len(info.row_errors), pf.shard_size)
    elif info.source == "checkpoint" and len(records) < pf.num_shards:
        saved = read_scan(out / SCAN_FILE)
        picks = {int(k): v for k, v in ((saved[1].get("picks") or {}) if saved else {}).items()}
    if info.source == "scan":
        write_scan(out / SCAN_FILE, info, {"ident": pf.ident, "shard_size": pf.shard_size,
                                           "picks": {str(k): v for k, v in picks.items()}})
    return Plan(cfg, info, out, pf.ident, pf.shard_size, pf.num_shards, records, prev, prior_runs(prev), picks)


def _drop_rows(sample, rows) -> None:
    """The audit's sample (cluster/audit.Sample: each runnable row's key and row) without ``rows``."""
    from array import array

    import numpy as np

    keep = ~np.isin(np.frombuffer(sample.rows, dtype=np.int64), np.fromiter(rows, dtype=np.int64))
    for name, code, dtype in (("keys", "Q", np.uint64), ("rows", "q", np.int64)):
        kept = array(code)
        kept.frombytes(np.frombuffer(getattr(sample, name), dtype=dtype)[keep].tobytes())
        setattr(sample, name, kept)
