"""Reduce per-shard SpDPerfMetrics (one engine run each) into the job's aggregate.

The definitions of each metric for one run are in engine/metrics.py. A job is many runs, on
several pairs at once, perhaps over several resumed invocations. W below is the job wall time:
wall seconds from the start of each invocation (job.json's ``runs[i].started_at``) to its last
shard result, summed over the invocations that ran shards (a resumed job adds its own; Ray and
actor start-up, model loading included, are in it and are also reported on their own as
``actor_startup_s``; an invocation that ran no shard adds nothing).

Rules, field by field:
  counts                 summed: decode_iterations, num_generated_tokens, num_decode_tokens,
                         num_row_steps, num_accepted_tokens, target_forwards; proposed/accepted_per_position summed
                         position by position (shorter lists padded with 0).
  busy times             summed, so they are pair-seconds, not wall seconds: prefill_time,
                         decode_time, decode_draft_time, decode_target_time.
  e2e_time               W.
  e2e_throughput         all generated tokens / W.
  decode_throughput      decode tokens / (W * sum(decode_time) / sum(shard e2e_time)): the decode
                         tokens over the decode share of the wall time. For one shard with
                         W = its e2e_time this is exactly its own decode_throughput.
  mean_ttft              mean over every prompt the engine ran (not error rows): the shard means
                         weighted by the number of such prompts in each shard.
  mean_num_accepted_tokens  mean over all (row, step) pairs, from the integer counts:
                         sum(num_accepted_tokens) / sum(num_row_steps). results/*.parquet has
                         both per prompt (num_accepted_tokens, num_decode_iterations), so
                         sum(num_accepted_tokens) / sum(num_decode_iterations) over its rows is
                         exactly this figure (README, "Output"). A record without
                         num_accepted_tokens (written before it existed) gives
                         round(mean * num_row_steps); one without row steps, its mean weighted
                         by decode_iterations.
  max_gen_len            max.
  batch_ttft             seconds from the job's first dispatch until every pair's first shard had
                         its first batch's first tokens: max over pairs of (dispatch offset of the
                         pair's first shard + that shard's batch_ttft). Computed by the
                         coordinator; without it (every shard resumed) the first shard's.
  per-prompt lists       generated_tokens_per_prompt, ttft_per_prompt,
                         num_accepted_tokens_per_prompt: concatenated in shard order, which is
                         dataset order (error rows made by the driver, e.g. duplicate ids, are
                         not in them; the engine's own error rows are, with 0).
  acceptance_rate_per_position  from the summed counts (accepted / proposed per position).
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

from ..engine.metrics import CloudAI100ExecInfo, SpDPerfMetrics

_COUNTS = ("decode_iterations", "num_generated_tokens", "num_decode_tokens", "num_row_steps", "num_accepted_tokens",
           "target_forwards")
_TIMES = ("prefill_time", "decode_time", "decode_draft_time", "decode_target_time")
_LISTS = ("generated_tokens_per_prompt", "ttft_per_prompt", "num_accepted_tokens_per_prompt")
_POSITIONS = ("proposed_per_position", "accepted_per_position")


def empty_metrics() -> SpDPerfMetrics:
    return SpDPerfMetrics(mean_ttft=0.0, batch_ttft=0.0, decode_throughput=0.0, e2e_throughput=0.0,
                          mean_num_accepted_tokens=0.0, max_gen_len=0, generated_tokens_per_prompt=[],
                          e2e_time=0.0, decode_time=0.0, decode_draft_time=0.0, decode_target_time=0.0,
                          decode_iterations=0)


def metrics_from_record(record: dict) -> SpDPerfMetrics:
    """An SpDPerfMetrics from a shard record (unknown keys ignored, missing ones defaulted)."""
    base = dataclasses.asdict(empty_metrics())
    names = {f.name for f in dataclasses.fields(SpDPerfMetrics)}
    base.update({k: v for k, v in record.items() if k in names and v is not None})
    return SpDPerfMetrics(**base)


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


def reduce_metrics(shards: Sequence[SpDPerfMetrics], wall_time: float, num_ran: Sequence[int] | None = None,
                   batch_ttft: Optional[float] = None) -> SpDPerfMetrics:
    """Aggregate shard metrics (in shard order). `num_ran[i]`: prompts the engine ran in shard i
    (not error rows), the weight of its mean_ttft; default len(ttft_per_prompt)."""
    out = empty_metrics()
    if not shards:
        out.e2e_time = wall_time
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
    out.e2e_time = float(wall_time)
    out.e2e_throughput = out.num_generated_tokens / wall_time if wall_time > 0 else 0.0
    busy = sum(m.e2e_time for m in shards)
    decode_wall = wall_time * out.decode_time / busy if busy > 0 else 0.0
    out.decode_throughput = out.num_decode_tokens / decode_wall if decode_wall > 0 else 0.0
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


def first_batch_ttft(first_shards: Sequence[tuple[float, float]]) -> Optional[float]:
    """The batch_ttft rule: max over pairs of (dispatch offset, shard batch_ttft) summed."""
    return max((off + bt for off, bt in first_shards), default=None)


def aggregate_exec_info(metrics: SpDPerfMetrics, *, mode: str, settings, target_name: str,
                        draft_name: str = "") -> CloudAI100ExecInfo:
    """The job's CloudAI100ExecInfo. Per-prompt texts and ids stay in OUT/results (the driver
    does not hold the dataset), so prompts / generated_texts / generated_ids are empty here."""
    return CloudAI100ExecInfo(
        prompts=[], batch_size=settings.full_batch_size, generated_texts=[], generated_ids=[],
        perf_metrics=metrics, num_speculative_tokens=settings.num_speculative_tokens,
        prefill_seq_len=settings.prefill_seq_len, ctx_len=settings.ctx_len, prefill_bsz=1,
        draft_model_name=draft_name, target_model_name=target_name,
        full_batch_size=settings.full_batch_size, mode=mode,
    )
