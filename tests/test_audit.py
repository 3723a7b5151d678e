"""The audit's pieces without Ray: which prompts, how outputs are compared, how it is summed up,
and a real re-run on a tiny model (job-level tests are in test_cluster.py)."""

from __future__ import annotations

import numpy as np
import pytest

from spd_cluster.cluster import audit
from spd_cluster.engine.engine import SpDEngine
from spd_cluster.engine.metrics import PromptResult
from spd_cluster.engine.settings import SpDSettings
from spd_cluster.io.dataset import Row, Shard
from spd_cluster.sessions.torch_session import TorchSession
from tiny import tiny_model


def shards(n: int, size: int, bad=()) -> list[Shard]:
    rows = [Row(i, f"id{i}", f"p{i}", "dup" if i in bad else None) for i in range(n)]
    return [Shard(s, s * size, rows[s * size: (s + 1) * size]) for s in range(-(-n // size))]


def picked_ids(picks: dict, sh: list[Shard]) -> set[str]:
    return {sh[s].rows[i].prompt_id for s, pos in picks.items() for i in pos}


def pick(sh: list[Shard], fraction: float, min_prompts: int, seed: int, num_rows: int) -> dict:
    """The sample as a job draws it: every row seen once (the scan), then placed in its shard."""
    sample = audit.Sample(seed)
    for s in sh:
        for r in s.rows:
            sample.add(r)
    return sample.picks(fraction, min_prompts, num_rows, len(sh[0].rows))


def test_pick_is_a_deterministic_sample_of_the_ids():
    n = 500
    a = picked_ids(pick(shards(n, 16), 0.02, 4, 0, n), shards(n, 16))
    assert len(a) == 10  # ceil(0.02 * 500)
    # the same prompts whatever the sharding; another seed picks others
    assert picked_ids(pick(shards(n, 7), 0.02, 4, 0, n), shards(n, 7)) == a
    assert picked_ids(pick(shards(n, 16), 0.02, 4, 1, n), shards(n, 16)) != a
    # min_prompts wins on a small dataset, capped by the prompts there are; fraction 0 is off
    assert len(picked_ids(pick(shards(20, 4), 0.02, 4, 0, 20), shards(20, 4))) == 4
    assert len(picked_ids(pick(shards(3, 4), 0.02, 4, 0, 3), shards(3, 4))) == 3
    assert pick(shards(20, 4), 0.0, 4, 0, 20) == {}
    # rows the driver rejected are never audited; all-but-one rejected leaves one
    bad = set(range(1, 20))
    sh = shards(20, 4, bad)
    assert picked_ids(pick(sh, 0.5, 4, 0, 1), sh) == {"id0"}
    # positions are within each shard, sorted
    p = pick(shards(40, 8), 0.5, 0, 3, 40)
    assert sum(map(len, p.values())) == 20 and all(v == sorted(v) and max(v) < 8 for v in p.values())


def test_first_difference():
    assert audit.first_difference([1, 2, 3], [1, 2, 3]) is None
    assert audit.first_difference([1, 2, 3], [1, 5, 3]) == (1, 2, 5)
    assert audit.first_difference([1, 2], [1, 2, 7]) == (2, -1, 7)  # SpD stopped first
    assert audit.first_difference([1, 2, 9], [1, 2]) == (2, 9, -1)
    assert audit.first_difference([], []) is None


def result(ids, e2e=1.0, pid="a", error=None) -> PromptResult:
    return PromptResult(0, "p", pid, generated_ids=list(ids), e2e_s=e2e, error=error,
                        finish_reason="error" if error else "length")


def test_audit_rows_and_summary():
    job = [result([1, 2, 3], pid="a"), result([4, 5], pid="b"), result([], pid="c", error="empty")]
    spd = [result([1, 2, 3], 0.3, "a"), result([4, 5], 0.4, "b"), result([], 0.0, "c", error="empty")]
    base = [result([1, 2, 3], 0.6, "a"), result([4, 6], 0.6, "b"), result([], 0.0, "c", error="empty")]
    rows = audit.audit_rows(job, spd, base, sampling=False)
    assert [r["match"] for r in rows] == [True, False, None]
    assert rows[1]["first_diff_position"] == 1 and (rows[1]["spd_token"], rows[1]["baseline_token"]) == (5, 6)
    assert rows[0]["spd_time_per_token_s"] == pytest.approx(0.1) and rows[0]["baseline_time_per_token_s"] == pytest.approx(0.2)
    assert rows[2]["spd_time_per_token_s"] is None and rows[2]["error"] == "empty"
    s = audit.summarize(rows)
    # the error row is neither matched nor mismatched; speedup = mean(0.2, 0.3) / mean(0.1, 0.2)
    assert s == {"num_prompts": 3, "num_compared": 2, "num_matched": 1, "match_rate": 0.5,
                 "speedup": pytest.approx(0.25 / 0.15)}
    assert "50.00% (1/2 token-identical to the target alone; 1 not compared" in audit.describe(s)
    assert "1.67x" in audit.describe(s)
    # with sampling nothing is compared token by token
    srows = audit.audit_rows(job[:2], spd[:2], base[:2], sampling=True)
    assert [r["match"] for r in srows] == [None, None]
    assert audit.summarize(srows)["match_rate"] is None and "n/a (sampling" in audit.describe(audit.summarize(srows))
    assert audit.describe(audit.summarize([])).startswith("Audit: off")


@pytest.mark.parametrize("mode", ["pld", "multiproj"])
def test_run_audit_on_a_real_engine(mode):
    """The re-runs on one session: the job's own output matches the baseline's, times are
    measured, and a tampered job output is caught at the right token."""
    from spd_cluster.sessions.heads import TurboHeads

    model = tiny_model("llama")
    heads = TurboHeads(model.config.hidden_size, num_heads=3, num_layers=1) if mode == "multiproj" else None
    s = SpDSettings(num_speculative_tokens=3, max_new_tokens=16, ctx_len=96, prefill_seq_len=8, full_batch_size=2,
                    ignore_eos=True)
    engine = SpDEngine(mode, TorchSession(model, 2, 96, heads=heads), settings=s)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 90, size=n).tolist() for n in (5, 11, 7)]
    ids = ["x", "y", "z"]
    job = engine.generate(prompts, ids).results
    base = audit.baseline_engine(engine)
    assert base.mode == "baseline" and base.target is engine.target
    for shard_id in (0, 1):  # both orders
        rows = audit.run_audit(engine, base, shard_id, job, prompts, ids)
        assert [r["prompt_id"] for r in rows] == ids and all(r["match"] for r in rows)
        assert all(r["spd_time_per_token_s"] > 0 and r["baseline_time_per_token_s"] > 0 for r in rows)
        assert all(r["spd_num_tokens"] == r["baseline_num_tokens"] == 16 for r in rows)
    job[1].generated_ids[9] = (job[1].generated_ids[9] + 1) % 96
    rows = audit.run_audit(engine, base, 0, job, prompts, ids)
    assert [r["match"] for r in rows] == [True, False, True]
    assert rows[1]["first_diff_position"] == 9 and rows[1]["spd_token"] == job[1].generated_ids[9]
