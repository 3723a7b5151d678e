"""Reduction rules and throughput definitions of engine/reduce.py, one test per rule."""

from __future__ import annotations

import dataclasses

import pytest

from spd_cluster.engine import reduce as rd
from spd_cluster.engine.metrics import SpDPerfMetrics
from spd_cluster.engine.reduce import (aggregate_exec_info, empty_metrics, first_batch_ttft, metrics_from_record,
                                       reduce_metrics, reduce_records)
from spd_cluster.engine.settings import SpDSettings
from spd_cluster.io.results import metrics_record


def shard(gen, ttft, acc_steps, *, e2e, prefill, draft=0.0, target=0.0, iters=None, proposed=(), accepted=(),
          batch_ttft=0.0) -> SpDPerfMetrics:
    """A shard's metrics built like the engine does from per-prompt data."""
    steps = [a for s in acc_steps for a in s]
    decode_tokens = sum(gen) - len([g for g in gen if g])  # prefill makes one token per prompt
    decode_time = e2e - prefill
    return SpDPerfMetrics(
        mean_ttft=sum(ttft) / len(ttft), batch_ttft=batch_ttft,
        decode_throughput=decode_tokens / decode_time, e2e_throughput=sum(gen) / e2e,
        mean_num_accepted_tokens=sum(steps) / len(steps), max_gen_len=max(gen), generated_tokens_per_prompt=list(gen),
        e2e_time=e2e, decode_time=decode_time, decode_draft_time=draft, decode_target_time=target,
        decode_iterations=iters if iters is not None else max(len(s) for s in acc_steps), prefill_time=prefill,
        num_generated_tokens=sum(gen), num_decode_tokens=decode_tokens, num_row_steps=len(steps), num_accepted_tokens=sum(steps),
        target_forwards=(iters or 0) + len(gen), ttft_per_prompt=list(ttft),
        num_accepted_tokens_per_prompt=[sum(s) / len(s) for s in acc_steps],
        proposed_per_position=list(proposed), accepted_per_position=list(accepted))


A = shard([10, 6], [0.1, 0.3], [[3, 3, 3], [2, 1, 1, 1]], e2e=2.0, prefill=0.4, draft=0.5, target=1.0, iters=4,
          proposed=[7, 7, 5], accepted=[5, 3, 2], batch_ttft=0.35)
B = shard([4, 4, 8], [0.2, 0.2, 0.5], [[1, 2], [3], [4, 1, 2]], e2e=1.0, prefill=0.3, draft=0.2, target=0.4, iters=3,
          proposed=[6, 4], accepted=[4, 2], batch_ttft=0.6)


def test_one_shard_with_its_own_wall_time_is_itself():
    r = reduce_metrics([A], A.e2e_time)
    for f in dataclasses.fields(SpDPerfMetrics):
        assert getattr(r, f.name) == pytest.approx(getattr(A, f.name)), f.name


def test_counts_are_summed():
    r = reduce_metrics([A, B], 2.5)
    assert r.decode_iterations == 7 and r.num_generated_tokens == 32 and r.num_row_steps == 13
    assert r.num_decode_tokens == A.num_decode_tokens + B.num_decode_tokens
    assert r.target_forwards == A.target_forwards + B.target_forwards


def test_positions_summed_with_padding():
    r = reduce_metrics([A, B], 2.5)
    assert r.proposed_per_position == [13, 11, 5] and r.accepted_per_position == [9, 5, 2]
    assert r.acceptance_rate_per_position == pytest.approx([9 / 13, 5 / 11, 2 / 5])


def test_busy_times_are_summed_e2e_is_wall():
    r = reduce_metrics([A, B], 2.5)
    assert r.prefill_time == pytest.approx(0.7) and r.decode_time == pytest.approx(1.6 + 0.7)
    assert r.decode_draft_time == pytest.approx(0.7) and r.decode_target_time == pytest.approx(1.4)
    assert r.e2e_time == 2.5


def test_e2e_throughput_is_tokens_over_job_wall_time_decode_is_per_pair():
    r = reduce_metrics([A, B], 2.5)
    assert r.e2e_throughput == pytest.approx(32 / 2.5) and r.e2e_throughput == r.num_generated_tokens / r.e2e_time
    # decode: one pair's speed, decode tokens / decode pair-seconds (it was tokens over a "decode
    # share" of the job's wall time, a figure that moved with start-up and the number of pairs)
    assert r.decode_throughput == pytest.approx((A.num_decode_tokens + B.num_decode_tokens) / (1.6 + 0.7))
    # two pairs in parallel: the same shards in half the wall time give twice the e2e throughput,
    # and the same decode throughput
    r2 = reduce_metrics([A, B], 1.25)
    assert r2.e2e_throughput == pytest.approx(2 * r.e2e_throughput) and r2.decode_throughput == r.decode_throughput


def test_the_audit_is_left_out_of_the_job_throughput():
    recs = [{**metrics_record(A), "shard_id": 0, "pair_id": 0, "num_prompts": 2, "num_errors": 0, "wall_s": 3.0,
             "audit_s": 1.0, "busy_s": 2.0},
            {**metrics_record(B), "shard_id": 1, "pair_id": 0, "num_prompts": 3, "num_errors": 0, "wall_s": 1.0,
             "audit_s": 0.0, "busy_s": 1.0}]
    # one pair: 1 s start-up, then 4 s of shards (1 s of it the audit's), 0.2 s of driver overhead
    j = reduce_records(recs[::-1], 5.2, actor_startup_s=1.0)
    assert j.audit_time_s == 1.0 and j.audit_wall_time_s == pytest.approx(4.2 * 1.0 / 4.0)
    assert j.e2e_time == pytest.approx(5.2 - 1.05) and j.wall_time_s == 5.2 and j.actor_startup_s == 1.0
    assert j.metrics.e2e_throughput == pytest.approx(32 / (5.2 - 1.05))
    assert j.metrics.decode_throughput == reduce_metrics([A, B], 5.2).decode_throughput  # the audit is not in it
    assert (j.num_pairs, j.num_prompts, j.num_errors) == (1, 5, 0)
    assert j.metrics.generated_tokens_per_prompt == []  # records hold no per-prompt lists
    assert j.metrics.num_generated_tokens == 32  # reduced in shard order, whatever the order given
    # no audit: e2e_time is the wall time
    assert reduce_records([{**r, "audit_s": 0.0} for r in recs], 5.2, 1.0).e2e_time == 5.2
    assert rd.audit_wall_time(5.0, 6.0, 1.0, 4.0) == 0.0 and rd.audit_wall_time(5.0, 1.0, 0.0, 0.0) == 0.0


def test_per_shard_and_per_pair_figures():
    ra = {**metrics_record(A), "shard_id": 0, "pair_id": 1, "num_prompts": 2, "wall_s": 3.0, "audit_s": 1.0,
          "busy_s": 2.0}
    rb = {**metrics_record(B), "shard_id": 1, "pair_id": 1, "num_prompts": 3, "wall_s": 1.0}  # no busy_s: wall - audit
    s = rd.shard_figures(ra, 2.0, 3)
    assert s["tokens"] == 16 and s["busy_s"] == 2.0 and s["e2e_throughput"] == 8.0
    assert s["decode_throughput"] == pytest.approx(A.num_decode_tokens / A.decode_time)
    assert s["tokens_per_step"] == pytest.approx(14 / 7) and s["proposal_width"] == pytest.approx((7 + 7 + 5) / 7)
    assert s["speedup"] == 2.0 and s["audited"] == 3  # the audit's, carried
    assert rd.shard_figures(rb)["speedup"] is None and rd.shard_figures(rb)["busy_s"] == 1.0
    (p,) = rd.pair_figures([ra, rb])
    assert p["pair_id"] == 1 and p["shards"] == 2 and p["prompts"] == 5 and p["busy_s"] == 3.0
    assert p["e2e_throughput"] == pytest.approx(32 / 3.0) and p["decode_time"] == pytest.approx(2.3)
    assert p["tokens_per_step"] == pytest.approx(27 / 13) and p["proposal_width"] == pytest.approx((13 + 11 + 5) / 13)
    empty = rd.shard_figures({"shard_id": 2, "wall_s": 0.0})
    assert empty["tokens_per_step"] is None and empty["proposal_width"] is None and empty["e2e_throughput"] == 0.0


def test_step_counts_are_exact_from_the_position_counts():
    # 7 row steps; accepted at positions 1..3: 5, 3, 2 -> 2 steps emit 1, 2 emit 2, 1 emits 3, 2 emit 4
    assert rd.step_counts([5, 3, 2], 7) == {1: 2, 2: 2, 3: 1, 4: 2}
    assert rd.step_counts([], 4) == {1: 4}  # no speculation: every step emits one token
    assert rd.step_counts([2, 3], 4) == {} and rd.step_counts([1], 0) == {}  # counts that do not nest; no steps


def test_job_clock_from_job_json():
    runs = [{"wall_s": 10.0, "actor_startup_s": 2.0}, {"wall_s": 5.5, "actor_startup_s": 1.0}]
    assert rd.job_clock({"status": "running", "runs": runs, "wall_time_s": 10.0}) == (15.5, 3.0)
    assert rd.job_clock({"status": "completed", "runs": runs, "wall_time_s": 15.5004}) == (15.5004, 3.0)
    assert rd.job_clock({"status": "running", "runs": [{}]}) == (None, 0.0) and rd.job_clock(None) == (None, 0.0)


def test_mean_ttft_weighted_by_prompts_run():
    r = reduce_metrics([A, B], 2.5)
    assert r.mean_ttft == pytest.approx((0.1 + 0.3 + 0.2 + 0.2 + 0.5) / 5)
    # error rows (not run by the engine) carry no weight
    r = reduce_metrics([A, B], 2.5, num_ran=[2, 1])
    assert r.mean_ttft == pytest.approx((A.mean_ttft * 2 + B.mean_ttft * 1) / 3)


def test_mean_accepted_weighted_by_row_steps():
    r = reduce_metrics([A, B], 2.5)
    all_steps = [3, 3, 3, 2, 1, 1, 1, 1, 2, 3, 4, 1, 2]
    assert r.mean_num_accepted_tokens == pytest.approx(sum(all_steps) / len(all_steps))
    # a shard that reports no row steps falls back to decode_iterations as its weight
    a, b = dataclasses.replace(A, num_row_steps=0), dataclasses.replace(B, num_row_steps=0)
    r = reduce_metrics([a, b], 2.5)
    assert r.mean_num_accepted_tokens == pytest.approx((A.mean_num_accepted_tokens * 4 + B.mean_num_accepted_tokens * 3) / 7)


def test_max_and_lists_concatenated_in_shard_order():
    r = reduce_metrics([A, B], 2.5)
    assert r.max_gen_len == 10
    assert r.generated_tokens_per_prompt == [10, 6, 4, 4, 8]
    assert r.ttft_per_prompt == [0.1, 0.3, 0.2, 0.2, 0.5]
    assert len(r.num_accepted_tokens_per_prompt) == 5


def test_batch_ttft_rule():
    # pair 0's first shard dispatched at 0 s, pair 1's at 0.2 s
    assert first_batch_ttft([(0.0, A.batch_ttft), (0.2, B.batch_ttft)]) == pytest.approx(0.8)
    assert first_batch_ttft([]) is None
    assert reduce_metrics([A, B], 2.5, batch_ttft=0.8).batch_ttft == 0.8
    assert reduce_metrics([A, B], 2.5).batch_ttft == A.batch_ttft  # all resumed: the first shard's


def test_empty_and_zero_wall():
    r = reduce_metrics([], 3.0)
    assert r.e2e_time == 3.0 and r.e2e_throughput == 0.0 and r.generated_tokens_per_prompt == []
    r = reduce_metrics([empty_metrics()], 0.0)
    assert r.e2e_throughput == 0.0 and r.decode_throughput == 0.0 and r.mean_num_accepted_tokens == 0.0


def test_record_roundtrip_and_exec_info():
    rec = metrics_record(A)
    # a record keeps the aggregates only: per prompt, the figures are in the result rows
    assert not {"generated_tokens_per_prompt", "ttft_per_prompt", "num_accepted_tokens_per_prompt"} & set(rec)
    rec.update(shard_id=3, bogus="ignored")
    m = metrics_from_record(rec)
    assert m == dataclasses.replace(A, generated_tokens_per_prompt=[], ttft_per_prompt=[],
                                    num_accepted_tokens_per_prompt=[])
    info = aggregate_exec_info(reduce_metrics([A, B], 2.5), mode="pld", settings=SpDSettings(), target_name="t")
    text = str(info)
    assert "E2E Throughput = 12.8 tokens/s" in text and "Avg number of accepted tokens" in text
    assert info.mode == "pld" and info.full_batch_size == SpDSettings().full_batch_size
    assert "Job Wall Time" not in text  # an engine run's print: no job clock
    # a job's print says what its throughputs divide by, and the audit and start-up apart
    recs = [{**metrics_record(m), "shard_id": i, "pair_id": 0, "wall_s": w, "audit_s": a}
            for i, (m, w, a) in enumerate(((A, 3.0, 1.0), (B, 1.0, 0.0)))]
    j = reduce_records(recs, 5.0, actor_startup_s=1.0)
    text = str(aggregate_exec_info(j.metrics, mode="pld", settings=SpDSettings(), target_name="t", job=j))
    assert f"E2E Throughput = {round(32 / 4.0, 2)} tokens/s (32 tokens / 4.00 s)" in text
    assert "Decode Throughput = " in text and "tokens/s per pair" in text
    assert "Job Wall Time = 5.00 s (actor start-up 1.00 s; audit 1.00 s, not in the throughputs)" in text


def test_mean_accepted_is_the_ratio_of_the_summed_counts():
    r = reduce_metrics([A, B], 2.5)
    assert r.num_accepted_tokens == A.num_accepted_tokens + B.num_accepted_tokens == 14 + 13
    assert r.mean_num_accepted_tokens == r.num_accepted_tokens / r.num_row_steps  # exactly, not approx
    # a record written before num_accepted_tokens existed: recovered from mean * row steps
    old = [metrics_from_record({k: v for k, v in metrics_record(m).items() if k != "num_accepted_tokens"})
           for m in (A, B)]
    assert reduce_metrics(old, 2.5).mean_num_accepted_tokens == r.mean_num_accepted_tokens
