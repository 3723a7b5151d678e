"""A job's figures from its shards': the reduce rules and the throughput definitions, in one place.

engine/metrics.py defines each metric for one engine run (one shard). A job is many runs, on
several pairs at once, perhaps over several resumed invocations; the rules below make its
figures from the shards' records (SHARDS_SCHEMA rows, as dicts) or their SpDPerfMetrics. Pure
functions, no Ray, no pandas: the job's finish (exec_info.parquet and the CLI summary),
`spd-cluster status` and `spd-cluster report` all call them, so a figure has one definition.

Throughput, defined once (unit: tokens/s)
  e2e_throughput     generated tokens / e2e_time. Generated tokens: every prompt's, the token of
                     its prefill included. One engine run: e2e_time is the run's wall seconds.
                     A job: e2e_time is the job wall time W less the audit's share of it:
                       W                  each invocation's start (Ray and actor start-up, model
                                          loading included) to its last shard written, summed over
                                          the invocations (job.json ``wall_time_s``; a running job:
                                          its ``runs[i].wall_s`` summed);
                       audit_wall_time_s  (W - actor_startup_s) * sum(audit_s) / sum(wall_s) over
                                          the shards: the audit's share of the pairs' shard seconds,
                                          applied to the wall time the pairs ran in (exact with one
                                          pair; 0 without an audit);
                       e2e_time           W - audit_wall_time_s.
                     What a Ray Data or vLLM batch user reads: output tokens over the job's
                     elapsed seconds; it grows with the number of pairs.
  decode_throughput  tokens emitted by decode steps / decode seconds (a run's e2e_time less its
                     prefill), per pair: a job sums both over its shards (decode_time is then
                     pair-seconds), so it is one pair's decode speed, the seed's figure for one
                     engine run, whatever the number of pairs. The audit is in neither.
  per pair           e2e: its generated tokens / its busy seconds (busy_s = wall_s - audit_s,
                     summed over its shards); decode: its decode tokens / its decode seconds.
  per shard          e2e: generated tokens / busy_s; decode: the shard's own decode_throughput.
The audit is reported apart: audit_time_s (pair-seconds of its re-runs) and audit_wall_time_s.

Speculation, per shard, per pair and per job
  tokens per step    num_accepted_tokens / num_row_steps: tokens a row emits in a step, the
                     target's own included (engine/metrics.py's mean_num_accepted_tokens).
  proposal width     sum(proposed_per_position) / num_row_steps: tokens proposed per (row, step),
                     what adaptive k chose (0: speculation paused).
  audit speedup      cluster/audit.py's summarize (the audit's own rule), over a job's or a shard's
                     audited prompts; here it is only carried.

The other rules, field by field (``reduce_metrics``):
  counts                 summed: every integer field but max_gen_len (decode_iterations,
                         num_generated_tokens, num_decode_tokens, num_row_steps,
                         num_accepted_tokens, target_forwards, ...); proposed/accepted_per_position
                         summed position by position (shorter lists padded with 0).
  busy times             summed, so they are pair-seconds, not wall seconds: prefill_time,
                         decode_time, decode_draft_time, decode_target_time.
  mean_ttft              mean over every prompt the engine ran (not error rows): the shard means
                         weighted by the number of such prompts in each shard.
  mean_num_accepted_tokens  sum(num_accepted_tokens) / sum(num_row_steps), from the integer counts.
                         results/*.parquet has both per prompt (num_accepted_tokens,
                         num_decode_iterations), so the same ratio over its rows is exactly this
                         figure (README, "Output"). A record without num_accepted_tokens (written
                         before it existed) gives round(mean * num_row_steps); one without row
                         steps, its mean weighted by decode_iterations.
  max_gen_len            max.
  batch_ttft             seconds from the job's first dispatch until every pair's first shard had
                         its first batch's first tokens: max over pairs of (dispatch offset of the
                         pair's first shard + that shard's batch_ttft) (``first_batch_ttft``, from
                         the coordinator's clock); without it (every shard resumed) the first shard's.
  per-prompt lists       generated_tokens_per_prompt, ttft_per_prompt,
                         num_accepted_tokens_per_prompt: concatenated in shard order, which is
                         dataset order (error rows made by the driver, e.g. duplicate ids, are
                         not in them; the engine's own error rows are, with 0).
  acceptance_rate_per_position  from the summed counts (accepted / proposed per position).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Mapping, Optional, Sequence

from .metrics import CloudAI100ExecInfo, SpDPerfMetrics

# counts: every integer field but max_gen_len (fields added later, e.g. a mode's own counts, are summed too)
_COUNTS = tuple(f.name for f in dataclasses.fields(SpDPerfMetrics)
                if f.type in ("int", int) and f.name != "max_gen_len")
_TIMES = ("prefill_time", "decode_time", "decode_draft_time", "decode_target_time")
_LISTS = ("generated_tokens_per_prompt", "ttft_per_prompt", "num_accepted_tokens_per_prompt")
_POSITIONS = ("proposed_per_position", "accepted_per_position")


# -- the definitions -------------------------------------------------------------------------

def throughput(tokens: float, seconds: Optional[float]) -> float:
    """tokens / seconds (tokens/s); 0 when there are no seconds to divide by."""
    return float(tokens) / seconds if seconds is not None and seconds > 0 else 0.0


def audit_wall_time(wall_time: float, actor_startup_s: float, audit_s: float, shard_wall_s: float) -> float:
    """The audit's share of the job wall time: (W - start-up) * sum(audit_s) / sum(wall_s)."""
    if audit_s <= 0 or shard_wall_s <= 0:
        return 0.0
    ran = max(float(wall_time) - float(actor_startup_s), 0.0)
    return ran * min(float(audit_s) / float(shard_wall_s), 1.0)


def tokens_per_step(accepted_tokens: float, row_steps: float) -> Optional[float]:
    """Tokens a row emits in a step (accepted proposals + the target's own); None without steps."""
    return float(accepted_tokens) / row_steps if row_steps else None


def proposal_width(proposed_per_position: Sequence[int], row_steps: float) -> Optional[float]:
    """Tokens proposed per (row, step): sum(proposed_per_position) / num_row_steps."""
    return float(sum(int(v) for v in proposed_per_position)) / row_steps if row_steps else None


def step_counts(accepted_per_position: Sequence[int], row_steps: int) -> dict[int, int]:
    """Tokens emitted in one step -> number of (row, step) pairs, exactly, from the summed
    per-position counts: a step that accepted j proposals counts in accepted_per_position[0..j-1]
    and emits j + 1 tokens, so #steps emitting j + 1 = A[j-1] - A[j] (A[k] = 0) and #steps
    emitting 1 = row_steps - A[0]. Empty when there are no steps, or the counts do not nest."""
    if not row_steps:
        return {}
    a = [int(v) for v in accepted_per_position] + [0]
    counts = {1: int(row_steps) - a[0]}
    for j in range(1, len(a)):
        counts[j + 1] = a[j - 1] - a[j]
    return counts if min(counts.values()) >= 0 else {}


# -- records ---------------------------------------------------------------------------------

def _num(x: Any) -> Optional[float]:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return None if v != v else v  # NaN: missing


def empty_metrics() -> SpDPerfMetrics:
    return SpDPerfMetrics(mean_ttft=0.0, batch_ttft=0.0, decode_throughput=0.0, e2e_throughput=0.0,
                          mean_num_accepted_tokens=0.0, max_gen_len=0, generated_tokens_per_prompt=[],
                          e2e_time=0.0, decode_time=0.0, decode_draft_time=0.0, decode_target_time=0.0,
                          decode_iterations=0)


def _present(v: Any) -> bool:
    if v is None:
        return False
    try:
        return not (isinstance(v, float) and v != v)
    except TypeError:
        return True


def metrics_from_record(record: Mapping) -> SpDPerfMetrics:
    """An SpDPerfMetrics from a shard record (unknown keys ignored, missing ones defaulted)."""
    base = dataclasses.asdict(empty_metrics())
    names = {f.name for f in dataclasses.fields(SpDPerfMetrics)}
    for k, v in record.items():
        if k in names and _present(v):
            base[k] = list(v) if k in _POSITIONS or k in _LISTS else v
    return SpDPerfMetrics(**base)


def busy_seconds(record: Mapping) -> float:
    """A shard's busy seconds: busy_s (wall_s - audit_s); a record without it, wall_s - audit_s."""
    busy = _num(record.get("busy_s"))
    if busy is None:
        busy = max((_num(record.get("wall_s")) or 0.0) - (_num(record.get("audit_s")) or 0.0), 0.0)
    return busy


def _sum_positions(lists: Sequence[Sequence[int]]) -> list[int]:
    out: list[int] = []
    for li in lists:
        if len(li) > len(out):
            out += [0] * (len(li) - len(out))
        for i, v in enumerate(li):
            out[i] += int(v)
    return out


def _weighted_mean(values: Sequence[float], weights: Sequence[float]) -> float:
    total = sum(weights)
    return float(sum(v * w for v, w in zip(values, weights)) / total) if total > 0 else 0.0


def _accepted_tokens(m: SpDPerfMetrics) -> int:
    if m.num_accepted_tokens or not m.num_row_steps:
        return int(m.num_accepted_tokens)
    return int(round(m.mean_num_accepted_tokens * m.num_row_steps))


# -- the job ---------------------------------------------------------------------------------

def reduce_metrics(shards: Sequence[SpDPerfMetrics], wall_time: float, num_ran: Sequence[int] | None = None,
                   batch_ttft: Optional[float] = None, audit_wall_time_s: float = 0.0) -> SpDPerfMetrics:
    """Aggregate shard metrics (in shard order) over a job wall time ``wall_time`` of which
    ``audit_wall_time_s`` went to the audit. `num_ran[i]`: prompts the engine ran in shard i (not
    error rows), the weight of its mean_ttft; default len(ttft_per_prompt)."""
    out = empty_metrics()
    e2e = max(float(wall_time) - float(audit_wall_time_s), 0.0)
    out.e2e_time = e2e
    if not shards:
        return out
    if num_ran is None:
        num_ran = [len(m.ttft_per_prompt) or len(m.generated_tokens_per_prompt) for m in shards]
    for name in _COUNTS:
        setattr(out, name, int(sum(getattr(m, name) for m in shards)))
    for name in _TIMES:
        setattr(out, name, float(sum(getattr(m, name) for m in shards)))
    for name in _LISTS:
        setattr(out, name, [v for m in shards for v in getattr(m, name)])
    for name in _POSITIONS:
        setattr(out, name, _sum_positions([getattr(m, name) for m in shards]))
    out.e2e_throughput = throughput(out.num_generated_tokens, e2e)
    out.decode_throughput = throughput(out.num_decode_tokens, out.decode_time)
    out.mean_ttft = _weighted_mean([m.mean_ttft for m in shards], num_ran)
    out.num_accepted_tokens = int(sum(_accepted_tokens(m) for m in shards))
    if out.num_row_steps:
        out.mean_num_accepted_tokens = out.num_accepted_tokens / out.num_row_steps
    else:  # records without row steps
        out.mean_num_accepted_tokens = _weighted_mean([m.mean_num_accepted_tokens for m in shards],
                                                      [m.decode_iterations for m in shards])
    out.max_gen_len = max(m.max_gen_len for m in shards)
    out.batch_ttft = float(batch_ttft) if batch_ttft is not None else float(shards[0].batch_ttft)
    return out


@dataclasses.dataclass
class JobFigures:
    """A job's reduced figures: its metrics and the clock they were made over."""

    metrics: SpDPerfMetrics
    wall_time_s: float          # W: the job wall time (start-up and the audit included)
    actor_startup_s: float      # in W, reported apart
    audit_time_s: float         # pair-seconds of the audit's re-runs, summed over shards
    audit_wall_time_s: float    # the audit's share of W, left out of e2e_time
    num_pairs: int              # distinct pairs that ran the shards
    num_prompts: int
    num_errors: int

    @property
    def e2e_time(self) -> float:
        return self.metrics.e2e_time

    @property
    def proposal_width(self) -> Optional[float]:
        return proposal_width(self.metrics.proposed_per_position, self.metrics.num_row_steps)


def reduce_records(records: Iterable[Mapping], wall_time: float, actor_startup_s: float = 0.0,
                   batch_ttft: Optional[float] = None) -> JobFigures:
    """The job's figures from its shard records (any order; reduced in shard order) over the job
    wall time ``wall_time`` (W), ``actor_startup_s`` of which was actor start-up."""
    recs = sorted(records, key=lambda r: int(r["shard_id"]))
    audit_s = sum(_num(r.get("audit_s")) or 0.0 for r in recs)
    shard_wall = sum(_num(r.get("wall_s")) or 0.0 for r in recs)
    audit_wall = audit_wall_time(wall_time, actor_startup_s, audit_s, shard_wall)
    prompts = [int(_num(r.get("num_prompts")) or 0) for r in recs]
    errors = [int(_num(r.get("num_errors")) or 0) for r in recs]
    metrics = reduce_metrics([metrics_from_record(r) for r in recs], wall_time,
                             num_ran=[p - e for p, e in zip(prompts, errors)], batch_ttft=batch_ttft,
                             audit_wall_time_s=audit_wall)
    pairs = {int(r["pair_id"]) for r in recs if _num(r.get("pair_id")) is not None}
    return JobFigures(metrics, float(wall_time), float(actor_startup_s), audit_s, audit_wall, len(pairs),
                      sum(prompts), sum(errors))


def job_clock(job: Optional[Mapping]) -> tuple[Optional[float], float]:
    """(W, actor start-up seconds) from a job.json: an ended job's ``wall_time_s``; while it runs
    (or when its driver is gone) each run's ``wall_s`` summed, as each run's heartbeat keeps it.
    W is None when job.json holds no wall time (a job.json of another writer)."""
    runs = list((job or {}).get("runs") or [])
    startup = sum(_num(r.get("actor_startup_s")) or 0.0 for r in runs)
    if (job or {}).get("status") not in (None, "running") and _num(job.get("wall_time_s")) is not None:
        return float(job["wall_time_s"]), startup
    if any("wall_s" in r for r in runs):
        return sum(_num(r.get("wall_s")) or 0.0 for r in runs), startup
    return None, startup


def shard_figures(record: Mapping, speedup: Optional[float] = None, audited: int = 0) -> dict:
    """One shard's figures: tokens, busy seconds, e2e and decode throughput, tokens per step,
    proposal width; ``speedup``, ``audited``: its audit's speedup and prompts, carried along."""
    m = metrics_from_record(record)
    busy = busy_seconds(record)
    return {"shard_id": int(record["shard_id"]), "pair_id": _num(record.get("pair_id")),
            "tokens": m.num_generated_tokens, "busy_s": busy, "audit_s": _num(record.get("audit_s")) or 0.0,
            "e2e_throughput": throughput(m.num_generated_tokens, busy),
            "decode_throughput": throughput(m.num_decode_tokens, m.decode_time),
            "tokens_per_step": tokens_per_step(_accepted_tokens(m), m.num_row_steps),
            "proposal_width": proposal_width(m.proposed_per_position, m.num_row_steps),
            "row_steps": m.num_row_steps, "audited": audited, "speedup": speedup}


def pair_figures(records: Iterable[Mapping]) -> list[dict]:
    """Per pair (sorted by pair id): shards, prompts, tokens, busy seconds, e2e throughput
    (tokens / busy seconds), decode throughput (decode tokens / decode seconds), tokens per step
    and proposal width, over the shards it ran."""
    by_pair: dict[int, list[Mapping]] = {}
    for r in records:
        p = _num(r.get("pair_id"))
        if p is not None:
            by_pair.setdefault(int(p), []).append(r)
    out = []
    for pid in sorted(by_pair):
        recs = by_pair[pid]
        ms = [metrics_from_record(r) for r in recs]
        busy = sum(busy_seconds(r) for r in recs)
        tokens = sum(m.num_generated_tokens for m in ms)
        steps = sum(m.num_row_steps for m in ms)
        decode_s = sum(m.decode_time for m in ms)
        prompts = [_num(r.get("num_prompts")) for r in recs]
        out.append({"pair_id": pid, "shards": len(recs),
                    "prompts": int(sum(prompts)) if all(p is not None for p in prompts) else None,
                    "tokens": tokens, "busy_s": busy, "e2e_throughput": throughput(tokens, busy),
                    "decode_time": decode_s,
                    "decode_throughput": throughput(sum(m.num_decode_tokens for m in ms), decode_s),
                    "tokens_per_step": tokens_per_step(sum(_accepted_tokens(m) for m in ms), steps),
                    "proposal_width": proposal_width(_sum_positions([m.proposed_per_position for m in ms]), steps)})
    return out


def first_batch_ttft(first_shards: Sequence[tuple[float, float]]) -> Optional[float]:
    """The batch_ttft rule: max over pairs of (dispatch offset, shard batch_ttft) summed."""
    return max((off + bt for off, bt in first_shards), default=None)


def aggregate_exec_info(metrics: SpDPerfMetrics, *, mode: str, settings, target_name: str,
                        draft_name: str = "", job: Optional[JobFigures] = None) -> CloudAI100ExecInfo:
    """The job's CloudAI100ExecInfo. Per-prompt texts and ids stay in OUT/results (the driver
    does not hold the dataset), so prompts / generated_texts / generated_ids are empty here.
    ``job``: the clock the metrics were reduced over, which its summary prints."""
    info = CloudAI100ExecInfo(
        prompts=[], batch_size=settings.full_batch_size, generated_texts=[], generated_ids=[],
        perf_metrics=metrics, num_speculative_tokens=settings.num_speculative_tokens,
        prefill_seq_len=settings.prefill_seq_len, ctx_len=settings.ctx_len, prefill_bsz=1,
        draft_model_name=draft_name, target_model_name=target_name,
        full_batch_size=settings.full_batch_size, mode=mode,
    )
    if job is not None:
        info.job_wall_time_s, info.actor_startup_s = job.wall_time_s, job.actor_startup_s
        info.audit_wall_time_s = job.audit_wall_time_s
    return info
