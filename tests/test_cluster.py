"""The Ray layer end to end, on Ray bound to 127.0.0.1 only, with a tiny random llama.

One local Ray serves most tests (module fixture); the node-failure test then starts its own
head + worker with ray.cluster_utils.Cluster, and the last test runs a real `ray start --head`
+ `ray job submit`, stopped by its own process group.
"""

from __future__ import annotations

import os

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # before Ray is imported: loopback everywhere
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import json  # noqa: E402
import secrets  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from types import SimpleNamespace  # noqa: E402

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import ray  # noqa: E402

from spd_cluster.cluster import audit, coordinator, runtime  # noqa: E402
from spd_cluster.cluster.actors import DraftServer, RemoteDraftProposer, lock_device  # noqa: E402
from spd_cluster.cluster.cli import run_main  # noqa: E402
from spd_cluster.cluster.coordinator import run_job  # noqa: E402
from spd_cluster.config import ConfigError  # noqa: E402
from spd_cluster.io.dataset import DatasetError, iter_shards, scan  # noqa: E402
from spd_cluster.io.results import OutputError  # noqa: E402
from helpers import GOOD, InProcessPair, make_cfg, reference, results, write_jsonl  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


# -- no Ray needed -----------------------------------------------------------------------------

def test_bad_files_fail_before_any_model_loads(tmp_path, tiny, monkeypatch, capsys):
    def no_ray(*a, **k):
        raise AssertionError("Ray must not start for a bad input")

    monkeypatch.setattr(runtime, "init_ray", no_ray)
    ok = write_jsonl(tmp_path / "ok.jsonl", [{"id": 1, "prompt": "x"}])
    with pytest.raises(DatasetError, match="not found"):
        run_job(make_cfg(tiny, tmp_path / "missing.jsonl", tmp_path / "o"), progress=False)
    with pytest.raises(DatasetError, match=r"no row has the key 'id'"):
        run_job(make_cfg(tiny, write_jsonl(tmp_path / "noid.jsonl", [{"prompt": "x"}]), tmp_path / "o"), progress=False)
    (tmp_path / "c.parquet").write_bytes(b"PAR1 nope")
    with pytest.raises(DatasetError, match=r"c.parquet: not a readable Parquet"):
        run_job(make_cfg(tiny, tmp_path / "c.parquet", tmp_path / "o"), progress=False)
    (tmp_path / "afile").write_text("")
    with pytest.raises(OutputError, match="not writable"):
        run_job(make_cfg(tiny, ok, tmp_path / "afile" / "out"), progress=False)
    # the CLI says the same and exits 2
    cfg_path = tmp_path / "job.yaml"
    cfg_path.write_text(json.dumps({"mode": "pld", "target": {"model": tiny}, "dataset": {"path": str(ok)},
                                    "output": {"path": str(tmp_path / "o")}, "spd": {"ctx_len": 8}}))
    assert run_main(str(cfg_path)) == 2
    assert "ctx_len (8) must be >= prefill_seq_len (32)" in capsys.readouterr().err
    assert run_main(str(cfg_path), ["spd.ctx_len=64", "dataset.prompt_column=text"]) == 2
    assert "no row has the key 'text' (dataset.prompt_column)" in capsys.readouterr().err


def test_a_shard_is_committed_only_with_each_of_its_rows_once():
    """Exactly-once where rows cross (cluster/messages.py): the engine's results are the prompts
    sent, in order, by id, and the record the driver takes is the shard it asked for, whole."""
    from spd_cluster.cluster.messages import ShardDone, ShardRequest, rows_once
    from spd_cluster.io.dataset import Row, Shard

    shard = Shard(3, 6, [Row(6, "a", "x"), Row(7, "b", "y"), Row(8, "c", "z")])
    rows_once(shard, ["x", "y", "z"], ["x", "y", "z"])
    for back in (["x", "y"], ["x", "y", "z", "z"], ["x", "z", "y"], ["x", "y", "q"]):
        with pytest.raises(RuntimeError, match="shard 3: 3 prompts sent"):
            rows_once(shard, ["x", "y", "z"], back)
    done = ShardDone({"shard_id": 3, "pair_id": 1, "num_prompts": 3, "num_generated_tokens": 7, "audit_s": 0.5})
    assert done.check(ShardRequest(shard)) is done and (done.shard_id, done.pair_id, done.num_generated_tokens) == (3, 1, 7)
    with pytest.raises(ValueError, match="came back as shard 3 with 2 rows"):
        ShardDone({"shard_id": 3, "num_prompts": 2}).check(ShardRequest(shard))
    with pytest.raises(ValueError, match="came back as shard 4"):
        ShardDone({"shard_id": 4, "num_prompts": 3}).check(ShardRequest(shard))


def test_the_resume_line_is_how_the_job_was_started():
    """jobs/spd_batch.py under `ray job submit` (Ray sets RAY_JOB_CONFIG_JSON_ENV_VAR for its
    entrypoint) resumes with the submit line, by hand with the script itself."""
    from spd_cluster.cluster.cli import batch_prog, resume_command

    assert batch_prog({}, url=lambda: "http://x:1") == ["python", "jobs/spd_batch.py", "--config"]
    sub = batch_prog({"RAY_JOB_CONFIG_JSON_ENV_VAR": "{}"}, url=lambda: "http://127.0.0.1:8399")
    assert resume_command(sub, "c.yaml", ["cluster.num_pairs=2"], False) == (
        "ray job submit --address http://127.0.0.1:8399 --working-dir . -- python jobs/spd_batch.py --config c.yaml "
        "--set cluster.num_pairs=2")
    # the dashboard's address unreadable: `ray job submit` finds the local cluster's itself
    assert batch_prog({"RAY_JOB_CONFIG_JSON_ENV_VAR": "{}"}, url=lambda: None)[:4] == ["ray", "job", "submit",
                                                                                      "--working-dir"]


def test_device_lock_never_shares_an_id(tmp_path):
    a, fa = lock_device("qaic", [0, 1], tmp_path)
    b, fb = lock_device("qaic", [0, 1], tmp_path)
    assert {a, b} == {0, 1}
    with pytest.raises(RuntimeError, match="all taken"):
        lock_device("qaic", [0, 1], tmp_path)
    os.close(fa)  # the process holding it died
    c, fc = lock_device("qaic", [0, 1], tmp_path)
    assert c == a
    os.close(fb), os.close(fc)


# -- local Ray ---------------------------------------------------------------------------------

class _Handle:
    """Stands in for a draft actor handle: ``method.remote(...)`` runs here and returns an ObjectRef."""

    def __init__(self, server: DraftServer):
        self.server, self.deltas = server, []

    @property
    def draft_start(self):
        return SimpleNamespace(remote=lambda slot, ids, key=None: ray.put(self.server.start(slot, ids, key)))

    @property
    def draft_step(self):
        def step(slots, deltas, resync, limits):
            self.deltas.append((list(map(len, deltas)), list(resync)))
            return ray.put(self.server.step(slots, deltas, resync, limits))
        return SimpleNamespace(remote=step)


@pytest.mark.slow
@pytest.mark.parametrize("sampling", [{}, {"temperature": 0.8, "top_k": 20, "seed": 7}], ids=["greedy", "sampled"])
def test_remote_draft_proposer_is_the_in_process_one(tiny, local_ray, sampling):
    from spd_cluster.engine.engine import SpDEngine
    from spd_cluster.engine.proposers import DraftProposer
    from spd_cluster.engine.settings import SpDSettings
    from spd_cluster.sessions import load_session, load_tokenizer

    s = SpDSettings(num_speculative_tokens=3, max_new_tokens=20, ctx_len=128, prefill_seq_len=16, full_batch_size=2,
                    ignore_eos=True, adaptive_k=False, **sampling)
    sess = lambda: load_session(tiny, full_batch_size=2, ctx_len=128)  # noqa: E731
    tok = load_tokenizer(tiny)
    local = SpDEngine("draft", sess(), tok, s, draft=sess()).generate(GOOD[:5])
    handle = _Handle(DraftServer(DraftProposer(sess(), s.prefill_seq_len, sampling=s)))
    remote = RemoteDraftProposer(handle)
    got = SpDEngine("draft", sess(), tok, s, proposer=remote).generate(GOOD[:5])
    assert [list(x) for x in got.generated_ids] == [list(x) for x in local.generated_ids]
    m = got.perf_metrics
    assert m.accepted_per_position == local.perf_metrics.accepted_per_position
    assert m.proposed_per_position == local.perf_metrics.proposed_per_position
    if not sampling:  # draft == target, greedy: every proposal is accepted
        assert m.accepted_per_position == m.proposed_per_position
    # one round trip per step, and only the new tail crosses the wire (<= k + 1 tokens, no resync)
    assert remote.round_trips == got.perf_metrics.decode_iterations
    assert all(n <= s.num_speculative_tokens + 1 for lens, _ in handle.deltas for n in lens)
    assert not any(r for _, rs in handle.deltas for r in rs)
    # a sequence that does not extend the mirror is sent whole
    remote.sent[0] = np.array([5, 6, 7])
    handle.server.seqs[0] = np.array([5, 6, 7])
    remote.propose([0], [np.array([5, 9, 7, 8])], [0])  # limit 0: no draft forward
    assert handle.deltas[-1] == ([4], [True]) and handle.server.seqs[0].tolist() == [5, 9, 7, 8]


@pytest.mark.slow
@pytest.mark.parametrize("overlap_start", [True, False])
def test_a_draft_taking_turns_on_the_targets_cores_prefills_before_the_target(local_ray, overlap_start):
    """A pair whose actors share their cores (actors.shares_cpus) waits for the draft's prefill at
    ``start``, so the two prefills do not run at once on cores each was given whole; on devices
    of their own the draft's prefill runs beside the target's and is waited for at ``learn``."""
    import time

    @ray.remote
    def prefill_on_its_device():
        time.sleep(0.5)
        return time.monotonic()

    done = []
    start = SimpleNamespace(remote=lambda slot, ids, key=None: done.append(prefill_on_its_device.remote()) or done[-1])
    remote = RemoteDraftProposer(SimpleNamespace(draft_start=start), overlap_start=overlap_start)
    remote.start(0, np.array([5, 9, 7]))
    returned = time.monotonic()
    remote.learn([0], None)
    finished = ray.get(done[0])
    assert (finished <= returned) == (not overlap_start)


def test_a_slow_remote_draft_prefill_is_not_priced_as_its_steps(tiny, local_ray):
    """The draft's prefill runs on its own actor beside the target's and is waited for when the
    target's prefill is done, not inside the first step: adaptive k, which prices the draft by its
    proposal calls, still proposes (the first call used to carry the whole prefill, and the draft
    was priced out for good)."""
    import time

    from spd_cluster.engine.engine import SpDEngine
    from spd_cluster.engine.proposers import DraftProposer
    from spd_cluster.engine.settings import SpDSettings
    from spd_cluster.sessions import load_session, load_tokenizer
    from spd_cluster.sessions.timed import TimedSession

    @ray.remote
    def prefill_on_its_device():
        time.sleep(1.0)

    s = SpDSettings(num_speculative_tokens=3, max_new_tokens=24, ctx_len=128, prefill_seq_len=16, full_batch_size=1,
                    ignore_eos=True)
    sess = lambda: load_session(tiny, full_batch_size=1, ctx_len=128)  # noqa: E731
    handle = _Handle(DraftServer(DraftProposer(sess(), s.prefill_seq_len)))  # draft == target: all accepted
    slow = SimpleNamespace(remote=lambda slot, ids, key=None: (handle.server.start(slot, ids, key),
                                                               prefill_on_its_device.remote())[1])
    remote = RemoteDraftProposer(SimpleNamespace(draft_start=slow, draft_step=handle.draft_step))
    target = TimedSession(sess(), 0.02)  # a target step costs 20 ms: a draft forward is cheap beside it
    info = SpDEngine("draft", target, load_tokenizer(tiny), s, proposer=remote).generate(GOOD[:2])
    m = info.perf_metrics
    assert m.proposed_per_position[0] >= m.num_row_steps - 2 and m.mean_num_accepted_tokens > 3
    assert min(info.perf_metrics.ttft_per_prompt) >= 1.0  # the draft's prefill is the prompt's, in its TTFT


@pytest.mark.slow
def test_job_bad_rows_outputs_and_resume(tiny, local_ray, tmp_path):
    rows = [{"id": f"p{i}", "prompt": p} for i, p in enumerate(GOOD[:6])]
    rows[1:1] = [{"id": "empty", "prompt": ""}, {"id": "ws", "prompt": "  \n "}, {"id": "num", "prompt": 42},
                 {"id": "p0", "prompt": "duplicate id"}, {"id": "long", "prompt": "the quick brown fox " * 60}]
    ds = write_jsonl(tmp_path / "d.jsonl", rows)
    out = tmp_path / "out"
    cfg = make_cfg(tiny, ds, out, max_error_fraction=1)  # 5 of 11 rows are errors by design
    events = []
    res = run_job(cfg, progress=False, on_event=lambda kind, **kw: events.append((kind, kw)))
    assert res.status == "completed" and res.num_prompts == 11 and res.shards_run == 3 and res.shards_skipped == 0

    df = results(out)
    assert df.row.tolist() == list(range(11))  # every prompt exactly once, in order
    assert list(df.columns[:3]) == ["prompt_id", "row", "prompt"]
    err = df.set_index("prompt_id").loc[["empty", "ws", "num", "long"]]
    assert (err.finish_reason == "error").all()
    assert "empty" in err.error["empty"] and "whitespace" in err.error["ws"] and "not a string" in err.error["num"]
    assert "ctx_len" in err.error["long"]
    dup = df[df.prompt == "duplicate id"].iloc[0]
    assert dup.finish_reason == "error" and "duplicate prompt_id 'p0'" in dup.error
    assert res.num_errors == 5
    ok = df[df.finish_reason != "error"]
    assert set(ok.finish_reason) <= {"eos", "length", "ctx_len"} and ok.error.isna().all()
    assert (ok.num_generated_tokens == ok.generated_ids.map(len)).all() and (ok.ttft_s > 0).all()
    ref = reference(tiny, cfg)
    assert {r: list(g) for r, g in zip(ok.row, ok.generated_ids)} == ref
    assert set(df.pair_id) <= {0, 1} and df.shard_id.tolist() == [i // 4 for i in range(11)]

    shards = pd.read_parquet(out / "shards.parquet")
    assert shards.shard_id.tolist() == [0, 1, 2] and shards.num_prompts.sum() == 11 and (shards.attempts == 1).all()
    ex = pd.read_parquet(out / "exec_info.parquet")
    assert len(ex) == 1 and ex.num_prompts[0] == 11 and ex.num_errors[0] == 5 and ex["mode"][0] == "pld"
    assert ex.num_generated_tokens[0] == ok.num_generated_tokens.sum()
    m = res.exec_info.perf_metrics
    assert m.num_generated_tokens == ok.num_generated_tokens.sum()
    assert m.e2e_time == pytest.approx(res.wall_time_s - (res.exec_info.audit_wall_time_s or 0.0))  # the audit apart
    assert "E2E Throughput" in str(res.exec_info)
    job = json.loads((out / "job.json").read_text())
    assert job["status"] == "completed" and job["versions"]["ray"] == ray.__version__
    assert job["config"]["spd"]["max_new_tokens"] == 24 and job["dataset"]["num_rows"] == 11
    assert {k for k, _ in events} >= {"ready", "dispatch", "done"}

    # the audit (default: 2%, at least 4 prompts) re-ran the sampled prompts against the baseline
    # (the sample: the 4 runnable rows with the smallest sha256(seed, id), whatever the sharding)
    info = scan(ds, "prompt", "id")
    runnable = [r.prompt_id for sh in iter_shards(info, 4, "prompt", "id") for r in sh.rows if r.error is None]
    want = set(sorted(runnable, key=lambda pid: audit.audit_key(0, pid))[:4])
    au = pd.read_parquet(out / "audit.parquet")
    assert set(au.prompt_id) == want and len(au) == 4
    ok_au = au[au.error.isna()]
    assert len(ok_au) and ok_au["match"].all() and (ok_au.spd_time_per_token_s > 0).all()
    assert (ok_au.spd_num_tokens == ok_au.baseline_num_tokens).all() and au.first_diff_position.isna().all()
    assert (au.row.map(df.set_index("row").prompt_id) == au.prompt_id).all()
    assert ex.audit_num_prompts[0] == 4 and ex.audit_match_rate[0] == 1.0
    # a timed figure: a speedup, or (the timing disturbed past tokens per step) none and the note why
    assert ex.audit_speedup[0] > 0 or "impossible" in res.audit["speedup_note"]
    assert res.audit["match_rate"] == 1.0 and res.exec_info.audit_match_rate == 1.0
    assert f"match rate 100.00% ({len(ok_au)}/{len(ok_au)} token-identical" in audit.describe(res.audit)

    # resume: nothing to do, nothing rewritten
    mtimes = {p: p.stat().st_mtime_ns for p in (out / "results").iterdir()}
    res2 = run_job(cfg, progress=False)
    assert res2.shards_run == 0 and res2.shards_skipped == 3
    assert {p: p.stat().st_mtime_ns for p in (out / "results").iterdir()} == mtimes
    # a lost shard is re-run alone, with the same rows (no duplicates)
    (out / "results" / "shard-00001.parquet").unlink()
    res3 = run_job(cfg, progress=False)
    assert res3.shards_run == 1 and res3.shards_skipped == 2
    au3 = pd.read_parquet(out / "audit.parquet")  # the re-run shard's audit rows, not twice
    assert sorted(au3.prompt_id) == sorted(au.prompt_id) and res3.audit["num_prompts"] == 4
    # the same rows; how many steps they took is adaptive k's choice, from step costs timed at load
    timing = ["pair_id", "ttft_s", "num_decode_iterations", "num_accepted_tokens", "mean_num_accepted_tokens"]
    pd.testing.assert_frame_equal(results(out).drop(columns=timing), df.drop(columns=timing))
    assert res3.exec_info.perf_metrics.num_generated_tokens == m.num_generated_tokens

    # a changed config on the same output is refused, unless asked to overwrite
    with pytest.raises(OutputError, match=r"spd.max_new_tokens: 24 -> 12"):
        run_job(make_cfg(tiny, ds, out, max_error_fraction=1, **{"spd.max_new_tokens": 12}), progress=False)
    res4 = run_job(make_cfg(tiny, ds, out, max_error_fraction=1, **{"spd.max_new_tokens": 12, "output.overwrite": "true",
                                                                    "cluster.num_pairs": 1}), progress=False)
    assert res4.shards_run == 3 and results(out).num_generated_tokens.max() <= 12


class TamperingPair(InProcessPair):
    """Its engine alters the job's output of the first audited prompt of each shard at token 3
    (the row the user gets, and what the audit compares): an injected mismatch, through the
    real coordinator."""

    def run(self, request):
        engine = self.actor.engine
        audit_pos = request.audit
        generate = engine.generate

        def tampered(*a, **kw):  # the shard's own run, not the audit's re-runs after it
            engine.generate = generate
            info = generate(*a, **kw)
            if audit_pos:
                info.results[audit_pos[0]].generated_ids[3] += 1
            return info

        engine.generate = tampered
        try:
            return super().run(request)
        finally:
            engine.generate = generate


@pytest.mark.slow
def test_injected_mismatch_is_reported_and_can_fail_the_job(tiny, local_ray, tmp_path, monkeypatch, capsys):
    from spd_cluster import report
    from spd_cluster.cluster import actors

    monkeypatch.setattr(actors, "Pair", TamperingPair)
    ds = write_jsonl(tmp_path / "d.jsonl", [{"id": f"p{i}", "prompt": p} for i, p in enumerate(GOOD[:8])])
    over = {"spd.ignore_eos": "true", "audit.fraction": 0.5, "cluster.num_pairs": 1}
    res = run_job(make_cfg(tiny, ds, tmp_path / "out", **over), progress=False)
    assert res.status == "completed"  # a mismatch alone does not fail a job
    au = pd.read_parquet(tmp_path / "out" / "audit.parquet")
    bad = au[~au["match"]]
    assert len(au) == 4 and len(bad) == 2 == len(set(bad.shard_id))  # one per shard that had audited prompts
    assert (bad.first_diff_position == 3).all() and (bad.spd_token == bad.baseline_token + 1).all()
    ok = results(tmp_path / "out").set_index("prompt_id")
    assert all(ok.generated_ids[p][3] == t for p, t in zip(bad.prompt_id, bad.spd_token))
    assert res.audit["match_rate"] == 0.5 and pd.read_parquet(tmp_path / "out" / "exec_info.parquet").audit_match_rate[0] == 0.5
    table = report.terminal_table(tmp_path / "out")
    assert "50.0% (2/4 identical, 2 mismatched)" in table

    # audit.fail_on_mismatch: the job fails (exit 1), with the prompts named, and everything stays on disk
    cfg_path = tmp_path / "job.yaml"
    cfg_path.write_text(json.dumps(make_cfg(tiny, ds, tmp_path / "out2", **over).model_dump(mode="json")))
    assert run_main(str(cfg_path), ["audit.fail_on_mismatch=true"], progress=False) == 1
    err = capsys.readouterr().err
    assert "audit: 2 of 4 audited prompts differ" in err and f"prompt {bad.prompt_id.iloc[0]!r}" in err
    job = json.loads((tmp_path / "out2" / "job.json").read_text())
    assert job["status"] == "failed" and "audit" in job["error"]
    assert len(pd.read_parquet(tmp_path / "out2" / "results")) == 8 and len(pd.read_parquet(tmp_path / "out2" / "audit.parquet")) == 4


@pytest.mark.slow
def test_a_cancelled_job_counts_the_shards_on_disk(tiny, local_ray, tmp_path, monkeypatch, capsys):
    """A pair writes a shard's file and the job is cancelled before the driver has its record
    (issue 28: the CLI and job.json said 6 shards, 7 were on disk): the CLI, job.json, status and
    the report all count the files there, shards and prompts, and a resume skips them."""
    from spd_cluster import report
    from spd_cluster import status as status_mod
    from spd_cluster.cluster import actors
    from spd_cluster.cluster.errors import JobCancelled
    from spd_cluster.io import results as rio

    class CancelledAsItWrites(InProcessPair):
        def run(self, request):
            ref = super().run(request)  # the shard's file is written
            if request.shard_id == 2:
                raise JobCancelled(signal.SIGTERM)  # `ray job stop` lands before the driver takes the record
            return ref

    monkeypatch.setattr(actors, "Pair", CancelledAsItWrites)
    n = 10
    ds = write_jsonl(tmp_path / "d.jsonl", [{"id": i, "prompt": GOOD[i % len(GOOD)]} for i in range(n)])
    out = tmp_path / "out"
    cfg_path = tmp_path / "job.yaml"
    cfg_path.write_text(json.dumps({
        "name": "cancelled", "mode": "pld", "target": {"model": tiny}, "dataset": {"path": str(ds), "id_column": "id"},
        "output": {"path": str(out)}, "audit": {"fraction": 0},
        "spd": {"max_new_tokens": 8, "ctx_len": 128, "prefill_seq_len": 16, "full_batch_size": 2},
        "cluster": {"num_pairs": 1, "shard_size": 2}}))
    assert run_main(str(cfg_path), progress=False) == 128 + signal.SIGTERM
    err = capsys.readouterr().err
    on_disk = rio.written_shards(out)
    assert sorted(on_disk) == [0, 1, 2]  # the third was written as the job was stopped
    job = json.loads((out / "job.json").read_text())
    assert job["status"] == "cancelled" and job["shards_done"] == 3 and job["prompts_done"] == 6
    assert job["runs"][-1]["shards_run"] == 3 and job["runs"][-1]["prompts_run"] == 6
    assert "cancelled (SIGTERM): 3 of 5 shards (6 of 10 prompts) written to" in err
    st = status_mod.job_status(out)
    assert (st["state"], st["shards_done"], st["prompts_done"]) == ("cancelled", 3, 6)
    assert "spd-cluster run" in st["resume"]
    fig = report.compute(report.load_job(out))
    assert (fig.status, fig.shards_done, fig.prompts_done) == ("cancelled", 3, 6)
    assert len(pd.read_parquet(out / "shards.parquet")) == 3

    monkeypatch.setattr(actors, "Pair", InProcessPair)
    res = run_job(coordinator_cfg(cfg_path), progress=False)
    assert (res.status, res.shards_skipped, res.shards_run, res.shards_written, res.prompts_written) == (
        "completed", 3, 2, 5, n)
    job = json.loads((out / "job.json").read_text())
    assert [r["status"] for r in job["runs"]] == ["cancelled", "completed"] and job["runs"][-1]["shards_skipped"] == 3
    assert results(out).row.tolist() == list(range(n))  # each prompt once


@pytest.mark.slow
def test_a_complete_job_is_not_scanned_again(tiny, local_ray, tmp_path, monkeypatch):
    """Running a job whose every shard is written (same config, same dataset) reads job.json and
    the checkpoint only: the dataset is neither scanned nor read (issue 27: a finished 10M job
    took 44 s to find it had nothing to do). A changed dataset is scanned, and refused."""
    from spd_cluster.cluster import actors
    from spd_cluster.cluster.preflight import preflight
    from spd_cluster.io import dataset as dsmod

    monkeypatch.setattr(actors, "Pair", InProcessPair)
    ds = write_jsonl(tmp_path / "d.jsonl", [{"id": i, "prompt": p} for i, p in enumerate(GOOD[:6])])
    out = tmp_path / "out"
    cfg = make_cfg(tiny, ds, out, **{"cluster.num_pairs": 1, "audit.fraction": 0})
    res = run_job(cfg, progress=False)
    assert (res.status, res.shards_run, res.shards_skipped) == ("completed", 2, 0)

    def no_read(*a, **k):
        raise AssertionError("a complete job's dataset is not read again")

    with monkeypatch.context() as m:
        m.setattr(dsmod, "scan", no_read)
        m.setattr(dsmod, "iter_rows", no_read)
        again = run_job(cfg, progress=False)
        checks = {c.name: c for c in preflight(cfg, for_run=False).checks}
    assert (again.status, again.shards_run, again.shards_skipped, again.num_prompts) == ("completed", 0, 2, 6)
    assert again.exec_info.perf_metrics.num_generated_tokens == res.exec_info.perf_metrics.num_generated_tokens
    assert "not scanned again" in checks["dataset"].detail and all(c.ok for c in checks.values())
    assert json.loads((out / "job.json").read_text())["dataset"]["num_rows"] == 6

    with open(ds, "a") as f:
        f.write(json.dumps({"id": 99, "prompt": "one more"}) + "\n")
    with pytest.raises(OutputError, match="dataset file contents changed"):
        run_job(cfg, progress=False)


def coordinator_cfg(path: Path):
    from spd_cluster.config import load_config

    return load_config(str(path))


@pytest.mark.slow
def test_draft_mode_over_two_actors(tiny, local_ray, tmp_path):
    """Draft == target: every proposal is accepted (k + 1 per step), and the output is the
    target's greedy output, as in the in-process engine."""
    ds = write_jsonl(tmp_path / "d.jsonl", [{"id": i, "prompt": p} for i, p in enumerate(GOOD[:4])])
    # 1 + 5 steps of k + 1 = 4; k fixed (adaptive k would not run a draft as dear as the target)
    over = {"spd.ignore_eos": "true", "spd.max_new_tokens": 21, "spd.adaptive_k": "false"}
    cfg = make_cfg(tiny, ds, tmp_path / "out", mode="draft", **{"draft.model": tiny, "cluster.num_pairs": 1}, **over)
    res = run_job(cfg, progress=False)
    assert res.exec_info.perf_metrics.mean_num_accepted_tokens == 4.0
    df = results(tmp_path / "out")
    ref = reference(tiny, make_cfg(tiny, ds, tmp_path / "x", mode="baseline", **over))
    assert {r: list(g) for r, g in zip(df.row, df.generated_ids)} == ref
    assert (df.mean_num_accepted_tokens > 3.0).all() and res.exec_info.draft_model_name == tiny


@pytest.mark.slow
def test_a_model_that_cannot_load_fails_the_job_clearly(tiny, local_ray, tmp_path):
    ds = write_jsonl(tmp_path / "d.jsonl", [{"id": 1, "prompt": "x"}])
    # no such model: refused in the driver, before any actor starts
    cfg = make_cfg(tiny, ds, tmp_path / "out", **{"target.model": str(tmp_path / "no-such-model")})
    with pytest.raises(ConfigError, match=r"target.model=.*no-such-model"):
        run_job(cfg, progress=False)
    # a model directory whose weights are missing: the actor's load error ends the job, named
    broken = tmp_path / "broken"
    broken.mkdir()
    shutil.copy(Path(tiny) / "config.json", broken / "config.json")
    cfg = make_cfg(tiny, ds, tmp_path / "out2", **{"target.model": str(broken), "cluster.num_pairs": 1,
                                                   "cluster.max_retries": 0})
    with pytest.raises(coordinator.JobError, match=r"every pair failed.*target actor of pair 0 failed to load"):
        run_job(cfg, progress=False)
    job = json.loads((tmp_path / "out2" / "job.json").read_text())
    assert job["status"] == "failed" and "failed to load" in job["error"]


@pytest.mark.slow
def test_an_actor_no_node_can_host_fails_at_once(tiny, local_ray, tmp_path):
    ds = write_jsonl(tmp_path / "d.jsonl", [{"id": 1, "prompt": "x"}])
    with pytest.raises(coordinator.JobError, match=r"no node .* can host a cpu actor needing \{'CPU': 64\}"):
        run_job(make_cfg(tiny, ds, tmp_path / "out", **{"cluster.cpus_per_actor": 64}), progress=False)
    with pytest.raises(coordinator.JobError, match=r"can host a qaic actor needing .*'qaic': 1"):
        run_job(make_cfg(tiny, ds, tmp_path / "out2", **{"target.device": "qaic"}), progress=False)


# -- a node dies -------------------------------------------------------------------------------

@pytest.mark.slow
def test_node_death_mid_shard_loses_nothing(tiny, tmp_path):
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    n = 24  # 12 shards: the worker's pair surely takes one, whichever actor loads first
    ds = write_jsonl(tmp_path / "d.jsonl", [{"id": i, "prompt": GOOD[i % len(GOOD)]} for i in range(n)])
    cfg = make_cfg(tiny, ds, tmp_path / "out", mode="baseline",
                   **{"spd.max_new_tokens": 96, "spd.ignore_eos": "true", "cluster.shard_size": 2})
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "include_dashboard": False,
        "_system_config": {"health_check_initial_delay_ms": 0, "health_check_period_ms": 300,
                           "health_check_failure_threshold": 3}})
    try:
        worker = cluster.add_node(num_cpus=1)
        ray.init(address=cluster.address, logging_level="WARNING")
        cluster.wait_for_nodes()
        worker_id, removed, seen = worker.node_id, [], []

        def on_event(kind, **kw):
            seen.append((kind, kw))
            # a shard was just handed to the pair on the worker node: kill the node under it
            if kind == "dispatch" and kw["node_id"] == worker_id and not removed:
                cluster.remove_node(worker, allow_graceful=False)
                removed.append(kw["shard_id"])

        res = run_job(cfg, progress=False, on_event=on_event)
    finally:
        ray.shutdown()
        cluster.shutdown()
    assert removed, "the worker node never took a shard"
    # the shard under the node (or, if it beat the kill, the next one sent there) was re-run elsewhere
    retried = {kw["shard_id"] for k, kw in seen if k == "retry"}
    assert retried, "no shard was lost with the node"
    assert res.status == "completed"
    df = results(tmp_path / "out")
    assert df.row.tolist() == list(range(n))  # every prompt exactly once
    shards = pd.read_parquet(tmp_path / "out" / "shards.parquet").set_index("shard_id")
    for shard_id in retried:
        assert shards.loc[shard_id].attempts >= 2 and shards.loc[shard_id].node_id != worker_id
    assert {r: list(g) for r, g in zip(df.row, df.generated_ids)} == reference(tiny, cfg)


# -- the real thing: ray start + ray job submit -------------------------------------------------

@pytest.mark.slow
def test_ray_job_submit(tiny, tmp_path):
    if ray.is_initialized():
        ray.shutdown()
    bin_dir = Path(sys.executable).parent
    ds = write_jsonl(tmp_path / "d.jsonl", [{"id": i, "prompt": p} for i, p in enumerate(GOOD[:3])])
    cfg_path = tmp_path / "job.yaml"
    cfg_path.write_text(json.dumps({
        "name": "submitted", "mode": "pld", "target": {"model": tiny}, "dataset": {"path": str(ds)},
        "output": {"path": str(tmp_path / "out")},
        "spd": {"max_new_tokens": 8, "ctx_len": 128, "prefill_seq_len": 16, "full_batch_size": 2}}))
    env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_AUTH_MODE="token",
               RAY_AUTH_TOKEN=secrets.token_hex(32), RAY_USAGE_STATS_ENABLED="0")
    temp = Path("/tmp") / f"spdray-{secrets.token_hex(3)}"  # short: unix socket paths are limited
    # ports outside Ray's worker range (10002-19999), none of the fixed defaults (another Ray may hold them)
    gcs, dash, client, agent = (_free_port() for _ in range(4))
    head = subprocess.Popen(
        [str(bin_dir / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", f"--port={gcs}", f"--ray-client-server-port={client}",
         f"--dashboard-agent-listen-port={agent}", "--num-cpus=1", f"--temp-dir={temp}", "--include-dashboard=true"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    url = f"http://127.0.0.1:{dash}"
    try:
        _wait_for(url, head)
        sub = subprocess.run(
            [str(bin_dir / "ray"), "job", "submit", "--address", url, "--working-dir", str(REPO), "--",
             sys.executable, "jobs/spd_batch.py", "--config", str(cfg_path), "--no-progress"],
            env=env, capture_output=True, text=True, timeout=400)
        assert sub.returncode == 0, sub.stdout[-3000:] + sub.stderr[-3000:]
        assert "E2E Throughput" in sub.stdout and "output:" in sub.stdout
        assert len(pd.read_parquet(tmp_path / "out" / "results")) == 3
        job = json.loads((tmp_path / "out" / "job.json").read_text())
        assert job["status"] == "completed"
        assert job["ray"]["started_locally"] is False  # the job's driver joined this cluster
        assert job["ray"]["gcs_address"] == f"127.0.0.1:{gcs}"
        # how to resume it is how it was started: the submit line, this cluster's dashboard named
        assert job["runs"][-1]["command"] == (
            f"ray job submit --address {url} --working-dir . -- python jobs/spd_batch.py --config {cfg_path}")
    finally:
        os.killpg(head.pid, signal.SIGTERM)  # our own process group, nothing else
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()
        shutil.rmtree(temp, ignore_errors=True)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(url: str, head: subprocess.Popen, timeout: float = 180) -> None:
    import urllib.error
    import urllib.request

    deadline = time.time() + timeout
    while time.time() < deadline:
        if head.poll() is not None:
            pytest.fail(f"ray start exited: {head.stdout.read()[-3000:]}")
        try:
            urllib.request.urlopen(f"{url}/api/version", timeout=2)
            return
        except urllib.error.HTTPError:  # 401 without the token: it is up
            return
        except Exception:  # noqa: BLE001 - not up yet
            time.sleep(1)
    pytest.fail("the Ray dashboard never answered")
