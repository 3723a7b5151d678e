"""Stage 5 of a job's way, finish: the job's summary from its shard records, however it ended.

In: the plan, the records of every shard written (the commit stage's, with the files written
behind the driver's back picked up: commit.written_behind) and how the run ended (``Ending``).
Out: ``JobResult``, after writing the summary files: shards.parquet and audit.parquet (the last
checkpoint), exec_info.parquet (the reduce rules of engine/reduce.py over the records) and
job.json's final state, whose counts are those of the files on disk.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional

from ..engine.modes import draft_model
from ..io import results as rio
from . import audit as audit_mod
from .commit import all_audit_rows, now, written_behind
from .plan import Plan
from ..engine.reduce import aggregate_exec_info, reduce_records

if TYPE_CHECKING:
    from ..engine.metrics import CloudAI100ExecInfo
    from ..io.fs import Location


@dataclass
class JobResult:
    exec_info: "CloudAI100ExecInfo"
    output_path: "Location"
    status: str
    num_prompts: int
    num_errors: int
    shards_run: int  # shards this run wrote (the ones written behind the driver's back counted)
    shards_skipped: int  # shards written before this run (resume skipped them)
    wall_time_s: float
    failed_shards: dict[int, str] = field(default_factory=dict)
    audit: dict = field(default_factory=dict)  # audit.summarize() of the whole job
    shards_written: int = 0  # shards on disk when the job ended: skipped + run
    prompts_written: int = 0  # their rows


@dataclass
class Ending:
    """How a run ended, as the coordinator saw it."""

    status: str  # completed | failed | cancelled
    error: Optional[str]
    wall_s: float  # the job's wall time, summed over its runs
    batch_ttft: object  # reduce.first_batch_ttft of the run's first shards
    actor_startup_s: float  # the runs' start-up seconds (in wall_s too, reported apart)
    shards_run: int  # shards whose records this run's driver got
    failed: dict[int, str] = field(default_factory=dict)


def finish(plan: Plan, records: dict[int, dict], end: Ending, job: Optional[rio.JobFile] = None) -> JobResult:
    """The stage's entry point: pick up the shards written behind the driver's back, write the
    summary files and job.json's final state (``job``), and return what the CLI prints."""
    behind = written_behind(plan.out, records, plan.num_shards)
    exec_info, num_errors, audit = summarize(plan, records, end.wall_s, end.batch_ttft, end.actor_startup_s)
    shards_run = end.shards_run + len(behind)
    prompts = sum(int(r["num_prompts"]) for r in records.values())
    if job is not None:
        run = job.progress()  # this run's figures, the shards written behind it counted in
        run.update(shards_run=shards_run,
                   prompts_run=int(run.get("prompts_run") or 0) + sum(int(records[s]["num_prompts"]) for s in behind))
        job.progress = lambda: run
        job.run.update(ended_at=now(), status=end.status, error=end.error)
        job.write(status=end.status, ended_at=job.run["ended_at"], wall_time_s=end.wall_s, error=end.error,
                  num_errors=num_errors, shards_done=len(records), prompts_done=prompts,
                  failed_shards={str(k): v for k, v in end.failed.items()})
    return JobResult(exec_info, plan.out, end.status, plan.info.num_rows, num_errors, shards_run, plan.skipped,
                     end.wall_s, end.failed, audit, shards_written=len(records), prompts_written=prompts)


def summarize(plan: Plan, records: dict, wall: float, batch_ttft, actor_startup_s: float = 0.0
              ) -> tuple["CloudAI100ExecInfo", int, dict]:
    """The summary files from the shard records. ``wall``: the job wall time (summed over runs);
    ``actor_startup_s``: the runs' start-up seconds (in ``wall`` too, reported apart)."""
    cfg, out = plan.cfg, plan.out
    recs = [records[k] for k in sorted(records)]
    job_fig = reduce_records(recs, wall, actor_startup_s=actor_startup_s, batch_ttft=batch_ttft)
    metrics = job_fig.metrics
    draft_name = draft_model(cfg) or ""
    exec_info = aggregate_exec_info(metrics, mode=cfg.mode, settings=cfg.spd, target_name=cfg.target.model,
                                    draft_name=draft_name, job=job_fig)
    num_errors = sum(r["num_errors"] for r in recs)
    audited = all_audit_rows(records)
    audit = audit_mod.summarize(audited)
    exec_info.audit_match_rate, exec_info.audit_speedup = audit["match_rate"], audit["speedup"]
    if audited:
        rio.write_audit(out, audited)
    rio.write_shards_table(out, recs)
    s = cfg.spd
    rio.write_exec_info(out, {
        "name": cfg.name, "mode": cfg.mode, "target_model_name": cfg.target.model, "draft_model_name": draft_name,
        "num_speculative_tokens": s.num_speculative_tokens, "prefill_seq_len": s.prefill_seq_len,
        "ctx_len": s.ctx_len, "full_batch_size": s.full_batch_size, "prefill_bsz": 1,
        "batch_size": s.full_batch_size, "num_prompts": plan.info.num_rows, "num_errors": num_errors,
        "num_shards": plan.num_shards,
        "num_pairs": len({r["pair_id"] for r in recs if r.get("pair_id") is not None}),
        "num_pairs_configured": cfg.cluster.num_pairs, "actor_startup_s": actor_startup_s,
        "audit_time_s": job_fig.audit_time_s, "audit_wall_time_s": job_fig.audit_wall_time_s,
        **rio.metrics_record(metrics),
        "audit_num_prompts": audit["num_prompts"], "audit_match_rate": audit["match_rate"],
        "audit_speedup": audit["speedup"],
    })
    return exec_info, num_errors, audit


def audit_failure(rows: list[dict]) -> str:
    bad = [r for r in rows if r.get("match") is False]
    shown = "; ".join(f"prompt {r['prompt_id']!r} (row {r['row']}) at token {r['first_diff_position']}: "
                      f"SpD {r['spd_token']} vs baseline {r['baseline_token']}" for r in bad[:5])
    more = f"; and {len(bad) - 5} more" if len(bad) > 5 else ""
    return (f"audit: {len(bad)} of {sum(r.get('match') is not None for r in rows)} audited prompts differ "
            f"from the target alone (audit.fail_on_mismatch is set): {shown}{more}")
