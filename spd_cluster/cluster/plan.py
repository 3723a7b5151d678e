"""Stage 2 of a job's way, plan: which shards this run runs, and what it continues.

In: the preflight (cluster/preflight.py): the dataset's DatasetInfo, the output's OutputState
(the shards already written, read from the checkpoint: shards.parquet names them, only the files
written after it have their footers read) and the audit's sample. Out: ``Plan``: the shards to
run (a lazy iterator over the dataset that skips the written ones), the audit's picks per shard,
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

        ds, written = self.cfg.dataset, set(self.records)
        return (s for s in iter_shards(self.info, self.shard_size, ds.prompt_column, ds.id_column)
                if s.shard_id not in written)


def prepare_output(out: "Location", cfg: JobConfig, ident: str, dataset_sha: str, num_shards: int,
                   state: Optional[OutputState] = None) -> tuple[dict, dict]:
    """Check an existing output against this job (inspect_output, unless ``state`` is given) and
    make it ready: clear it (overwrite, or a job that wrote no shard), drop unreadable shard
    files. Returns (records of shards already written, the previous job.json or {})."""
    from ..io import fs as fsmod
    from ..io import results as rio

    state = state or inspect_output(out, cfg, ident, dataset_sha, num_shards)
    rio.remove_temporaries(out)  # of writers killed mid-write in an earlier run
    if state.clear:
        rio.clear_output(out)
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
    """The stage's entry point (after ``preflight(cfg, for_run=True)`` passed)."""
    cfg, info = pf.cfg, pf.info
    out = pf.out
    records, prev = prepare_output(out, cfg, pf.ident, info.sha256, pf.num_shards, pf.output)
    picks: dict[int, list[int]] = {}
    if len(records) < pf.num_shards and pf.sample is not None:
        a = cfg.audit
        picks = pf.sample.picks(a.fraction, a.min_prompts, info.num_rows - len(info.row_errors), pf.shard_size)
    return Plan(cfg, info, out, pf.ident, pf.shard_size, pf.num_shards, records, prev, prior_runs(prev), picks)
