"""Reduction rules of cluster/reduce.py, one test per rule."""

from __future__ import annotations

import dataclasses

import pytest

from spd_cluster.cluster.reduce import (aggregate_exec_info, empty_metrics, first_batch_ttft, metrics_from_record,
                                        reduce_metrics)
from spd_cluster.engine.metrics import SpDPerfMetrics
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


def test_throughputs_are_tokens_over_job_wall_time():
    r = reduce_metrics([A, B], 2.5)
    assert r.e2e_throughput == pytest.approx(32 / 2.5)
    decode_wall = 2.5 * (1.6 + 0.7) / (2.0 + 1.0)
    assert r.decode_throughput == pytest.approx((A.num_decode_tokens + B.num_decode_tokens) / decode_wall)
    # two pairs in parallel: the same shards in half the wall time give twice the throughput
    assert reduce_metrics([A, B], 1.25).e2e_throughput == pytest.approx(2 * r.e2e_throughput)


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
    assert "E2E Throughput = 12.8" in text and "Avg number of accepted tokens" in text
    assert info.mode == "pld" and info.full_batch_size == SpDSettings().full_batch_size


def test_mean_accepted_is_the_ratio_of_the_summed_counts():
    r = reduce_metrics([A, B], 2.5)
    assert r.num_accepted_tokens == A.num_accepted_tokens + B.num_accepted_tokens == 14 + 13
    assert r.mean_num_accepted_tokens == r.num_accepted_tokens / r.num_row_steps  # exactly, not approx
    # a record written before num_accepted_tokens existed: recovered from mean * row steps
    old = [metrics_from_record({k: v for k, v in metrics_record(m).items() if k != "num_accepted_tokens"})
           for m in (A, B)]
    assert reduce_metrics(old, 2.5).mean_num_accepted_tokens == r.mean_num_accepted_tokens
