"""Stage 4 of a job's way, commit: what is written stays written, and says so.

A shard's results file is written by the pair that ran it (cluster/actors.py, whole and under
its final name only once complete); the driver commits its record here (``Checkpoint.commit``)
and keeps the job's own files: job.json (``open_job`` at the run's start, rewritten at most every
JOB_WRITE_EVERY_S and by its heartbeat) and the checkpoint, shards.parquet with audit.parquet
(whose rows come back in the records), rewritten at most every CHECKPOINT_EVERY_S and at the end:
a resume reads it, one listing and the footers of the files written since (io/results.load_records).

``written_behind``: when a run ends, the shard files on disk whose records never reached the
driver (a pair finished a shard as the job was cancelled), so the counts the job reports (CLI,
job.json, status, report) are those of the files there.
"""

from __future__ import annotations

import importlib.metadata
import platform
import time
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Optional

from ..io import results as rio
from .messages import ShardDone
from .plan import Plan

if TYPE_CHECKING:
    from ..io.fs import Location

CHECKPOINT_EVERY_S = 30.0  # shards.parquet and audit.parquet are rewritten at most this often while a job runs
JOB_WRITE_EVERY_S = 1.0  # job.json after a shard at most this often (the heartbeat rewrites it too)


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def versions() -> dict[str, Optional[str]]:
    out: dict[str, Optional[str]] = {"python": platform.python_version(), "platform": platform.platform()}
    for pkg in ("spd-cluster", "ray", "torch", "transformers", "pyarrow", "numpy", "pydantic"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def all_audit_rows(records: dict) -> list[dict]:
    return [a for k in sorted(records) for a in records[k].get("audit") or []]


def open_job(plan: Plan, command: Optional[str], every_s: float) -> rio.JobFile:
    """job.json as a run starts: the config and its identity, the dataset, the runs it continues
    plus this one (``command``: how to run the job again, which `status` shows to resume)."""
    from ..status import driver_record

    cfg, info, c = plan.cfg, plan.info, plan.cfg.cluster
    driver = driver_record()
    placement = {"address": c.address, "num_pairs": c.num_pairs, "cpus_per_actor": c.cpus_per_actor}
    return rio.JobFile(plan.out, {
        "name": cfg.name, "status": "running", "config": cfg.model_dump(mode="json"),
        "identity": cfg.output_identity(), "config_hash": plan.ident,
        "dataset": {"path": str(info.path), "format": info.format, "num_rows": info.num_rows, "sha256": info.sha256},
        "num_shards": plan.num_shards, "shard_size": plan.shard_size, "versions": versions(),
        "started_at": plan.prev.get("started_at") or now(), "ended_at": None, "wall_time_s": plan.prior_wall_s,
        "driver": driver,
        "runs": plan.runs + [{"started_at": now(), "status": "running", "shards_skipped": plan.skipped,
                              "driver": driver, "placement": placement, "command": command}],
    }, every_s=every_s)


class Checkpoint:
    """The driver's side of the shards written: their records (shard id -> record, the plan's
    records of the shards written before this run among them), job.json and the checkpoint."""

    def __init__(self, out: "Location", records: dict[int, dict], job: Optional[rio.JobFile] = None,
                 checkpoint_every_s: float = CHECKPOINT_EVERY_S, job_every_s: float = JOB_WRITE_EVERY_S):
        self.out, self.records, self.job = out, records, job
        self.checkpoint_every_s, self.job_every_s = checkpoint_every_s, job_every_s
        self.checkpointed = self.job_written = time.perf_counter()

    def commit(self, done: ShardDone) -> None:
        """A shard written: its record joins the job's (a re-run replaces the record it had)."""
        self.records[done.shard_id] = done.record

    def tick(self, force: bool = False) -> None:
        """job.json (a driver killed now still leaves this run's wall time), and at longer
        intervals shards.parquet with audit.parquet, which a resume reads instead of footers."""
        t = time.perf_counter()
        if self.job is not None and (force or t - self.job_written > self.job_every_s):
            self.job.write()
            self.job_written = t
        if force or t - self.checkpointed > self.checkpoint_every_s:
            self.write_checkpoint()
            self.checkpointed = t

    def write_checkpoint(self) -> None:
        audited = all_audit_rows(self.records)
        if audited:  # first: a shard in shards.parquet has its audit rows in audit.parquet
            rio.write_audit(self.out, audited)
        rio.write_shards_table(self.out, [self.records[k] for k in sorted(self.records)])


def written_behind(out: "Location", records: dict[int, dict], num_shards: int) -> list[int]:
    """Add to ``records`` the shards whose files are on disk but whose records the driver never
    got (the pair wrote the file as the job was stopped, or died after writing it): one listing
    of OUT/results and the footers of those files. Returns their shard ids."""
    found = []
    for sid, loc in sorted(rio.written_shards(out).items()):
        if sid in records or sid >= num_shards:
            continue
        rec = rio.read_shard_record(loc)
        if rec is not None and int(rec.get("shard_id", -1)) == sid:
            records[sid] = rec
            found.append(sid)
    return found
