"""Each pair is one Ray placement group: a pair the cluster can never host fails the job at once,
pairs that cannot be placed yet are reported while the job runs on the placed ones, a dead
actor restarts inside its group, and every group is removed when the job ends. Ray on
127.0.0.1 with 2 CPUs."""

from __future__ import annotations

import logging
import os
import signal
from contextlib import contextmanager

import pandas as pd
import pytest
from ray.util import placement_group_table
from helpers import GOOD, make_cfg, reference, results, write_jsonl  # tiny, ray2: fixtures (conftest.py)

from spd_cluster.cluster.coordinator import JobError, run_job


@contextmanager
def deadline(seconds: int):
    """A job that would wait forever fails the test instead of hanging it."""
    def expired(*_):
        raise TimeoutError(f"the job gave no answer within {seconds} s")

    old = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def groups(before=()) -> dict:
    return {k: v for k, v in placement_group_table().items() if k not in before}


@pytest.mark.slow
def test_a_pair_the_cluster_cannot_host_fails_at_once(tiny, ray2, tmp_path):
    """The user's case: 2 CPUs, draft mode, cpus_per_actor 2. Each actor fits alone, the pair
    does not: the target used to start and the draft wait forever, silently."""
    ds = write_jsonl(tmp_path / "d.jsonl", [{"id": i, "prompt": p} for i, p in enumerate(GOOD[:2])])
    cfg = make_cfg(tiny, ds, tmp_path / "out", mode="draft",
                   **{"draft.model": tiny, "cluster.num_pairs": 1, "cluster.cpus_per_actor": 2})
    before = groups()
    with deadline(120), pytest.raises(JobError) as e:
        run_job(cfg, progress=False)
    assert ("this Ray cluster cannot host one pair: a pair is placed as one unit (PACK placement group) and "
            "needs target {'CPU': 2} + draft {'CPU': 2}; nodes offer [{'CPU': 2.0}]") in str(e.value)
    assert groups(before) == {}  # refused before any group or actor was made


@pytest.mark.slow
def test_pairs_not_placed_yet_are_reported_and_the_job_runs_on(tiny, ray2, tmp_path, caplog):
    """2 CPUs, draft mode, 1 CPU per actor, 2 pairs: pair 0 is placed whole (target and draft in
    one group, on one node), pair 1 waits and is said to wait; the job runs on pair 0."""
    ds = write_jsonl(tmp_path / "d.jsonl", [{"id": i, "prompt": p} for i, p in enumerate(GOOD[:6])])
    cfg = make_cfg(tiny, ds, tmp_path / "out", mode="draft",
                   **{"draft.model": tiny, "cluster.num_pairs": 2, "spd.max_new_tokens": 8, "audit.fraction": 0})
    before = groups()
    events, seen = [], {}

    def on_event(kind, **kw):
        events.append((kind, kw))
        if kind == "ready":
            seen.update(groups(before))

    with deadline(300), caplog.at_level(logging.WARNING, logger="spd_cluster.cluster"):
        res = run_job(cfg, progress=False, on_event=on_event)
    assert res.status == "completed"
    waiting = [kw for k, kw in events if k == "waiting"]
    assert len(waiting) == 1 and waiting[0]["pair_ids"] == [1] and waiting[0]["num_waiting"] == 1
    assert waiting[0]["needs"] == [{"CPU": 1}, {"CPU": 1}]
    assert "1 of 2 pairs wait for resources (pairs [1])" in caplog.text
    assert "the job runs with the 1 placed" in caplog.text
    assert set(results(tmp_path / "out").pair_id) == {0}
    # while it ran: one group placed with both bundles on one node, the other still pending
    states = sorted(g["state"] for g in seen.values())
    assert states == ["CREATED", "PENDING"], seen
    placed = next(g for g in seen.values() if g["state"] == "CREATED")
    assert placed["strategy"] == "PACK" and len(placed["bundles"]) == 2
    assert len(set(placed["bundles_to_node_id"].values())) == 1
    # and when it ended, both groups were removed
    assert {g["state"] for g in groups(before).values()} == {"REMOVED"} and len(groups(before)) == 2


@pytest.mark.slow
def test_a_dead_actor_restarts_in_its_placement_group(tiny, ray2, tmp_path):
    ds = write_jsonl(tmp_path / "d.jsonl", [{"id": i, "prompt": GOOD[i]} for i in range(6)])
    cfg = make_cfg(tiny, ds, tmp_path / "out", mode="baseline",
                   **{"cluster.num_pairs": 1, "cluster.shard_size": 2, "spd.max_new_tokens": 96,
                      "spd.ignore_eos": "true", "audit.fraction": 0})
    before = groups()
    pids, killed, during = [], [], []

    def on_event(kind, **kw):
        if kind == "ready":
            pids.append(kw["info"]["pid"])
            during.append([g["state"] for g in groups(before).values()])
        if kind == "dispatch" and not killed:
            os.kill(pids[-1], signal.SIGKILL)  # the target actor's process, started by this job's Ray
            killed.append(kw["shard_id"])

    with deadline(300):
        res = run_job(cfg, progress=False, on_event=on_event)
    assert res.status == "completed" and killed
    shards = pd.read_parquet(tmp_path / "out" / "shards.parquet").set_index("shard_id")
    # the killed shard ran again, and so did the one waiting behind it on the dead actor (PREFETCH)
    lost = set(shards.index[shards.attempts == 2])
    assert killed[0] in lost <= {killed[0], killed[0] + 1} and set(shards.attempts) <= {1, 2}
    assert len(pids) == 2 and pids[0] != pids[1]  # restarted: a new process ...
    assert during == [["CREATED"], ["CREATED"]]  # ... in the same, still placed, group
    df = results(tmp_path / "out")
    assert df.row.tolist() == list(range(6))
    assert {r: list(g) for r, g in zip(df.row, df.generated_ids)} == reference(tiny, cfg)
    assert [g["state"] for g in groups(before).values()] == ["REMOVED"]


@pytest.mark.slow
def test_a_draft_pairs_cpu_actors_take_turns_on_the_cores_their_pair_holds(tiny, ray2, tmp_path):
    """Target and draft compute in turns (one waits while the other runs), so each runs on both
    CPUs the pair's group holds on the node; where the draft overlaps the verify they compute at
    once and keep one each."""
    import ray

    from spd_cluster.cluster.actors import Pair

    ds = write_jsonl(tmp_path / "d.jsonl", [{"id": 0, "prompt": GOOD[0]}])

    def threads(**over) -> tuple[int, int]:
        cfg = make_cfg(tiny, ds, tmp_path / "out", mode="draft", **{"draft.model": tiny}, **over)
        pair = Pair(0, cfg.model_dump(mode="json"), [(r, s.device) for r, s in cfg.roles()], 1, 0)
        try:
            with deadline(120):
                info = ray.get(pair.probe())
        finally:
            pair.kill()
        return info["threads"], info["draft"]["threads"]

    assert threads() == (2, 2)
    assert threads(**{"spd.overlap_draft": "true"}) == (1, 1)
