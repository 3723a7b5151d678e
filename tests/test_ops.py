"""Operating jobs like a job runner: validate, status, cancel (SIGINT / SIGTERM), a killed driver,
resume accounting, max_error_fraction, re-running after a run that wrote nothing, a quick CLI.

Real Ray bound to 127.0.0.1 only (the module fixture of test_cluster, or the local Ray each
`spd-cluster run` process starts of its own), real Parquet, the tiny random llama of test_cluster.
"""

from __future__ import annotations

import os

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # before Ray is imported: loopback everywhere

import json  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import pandas as pd  # noqa: E402
import psutil  # noqa: E402
import pytest  # noqa: E402
from helpers import GOOD, make_cfg, write_jsonl  # noqa: E402 - tiny, local_ray: fixtures (conftest.py)

from spd_cluster import status as status_mod  # noqa: E402
from spd_cluster.cluster import coordinator, runtime  # noqa: E402
from spd_cluster.cluster.cli import resume_command, run_main, validate_main  # noqa: E402
from spd_cluster.cluster.progress import Progress  # noqa: E402
from spd_cluster.cluster.preflight import locate_model  # noqa: E402
from spd_cluster.config import ConfigError  # noqa: E402
from spd_cluster.io import results as rio  # noqa: E402
from spd_cluster.io.dataset import scan  # noqa: E402

BIN = Path(sys.executable).parent
HEAVY = ("torch", "transformers", "ray", "pandas", "pyarrow")


def write_cfg(path: Path, cfg) -> Path:
    path.write_text(json.dumps(cfg.model_dump(mode="json")))
    return path


# -- a quick CLI -------------------------------------------------------------------------------

def _modules_after(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", code + "\nimport sys, json; print(json.dumps(sorted(sys.modules)))"],
                         capture_output=True, text=True, check=True)
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def test_help_and_status_import_no_torch_ray_or_pandas(tmp_path):
    """`spd-cluster --help` (and each command's parser but the one named) and `status` import
    none of torch, transformers, ray, pandas, pyarrow (status: pyarrow only, for the shard files)."""
    mods = _modules_after("from spd_cluster.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass")
    assert not mods & set(HEAVY), mods & set(HEAVY)
    mods = _modules_after("from spd_cluster.cli import build_parser\nbuild_parser(['status', 'x'])")
    assert not mods & set(HEAVY)
    out = tmp_path / "o"
    out.mkdir()
    (out / "job.json").write_text(json.dumps({"name": "j", "status": "completed", "num_shards": 0, "runs": []}))
    mods = _modules_after(f"from spd_cluster.cli import main\nmain(['status', {str(out)!r}])")
    assert not mods & {"torch", "transformers", "ray", "pandas"}
    # every command still has its full parser when named
    from spd_cluster.cli import COMMANDS, build_parser

    for name in COMMANDS:
        p = build_parser([name])
        assert p._subparsers._group_actions[0].choices[name]._actions[1:], name  # more than -h
    # a config error, in validate and in run, is found and told without any of them
    bad = tmp_path / "bad.yaml"
    bad.write_text("mode: pld\ntarget: {model: x}\ndataset: {path: d.jsonl}\noutput: {path: o}\ncluster: {num_pair: 2}\n")
    for cmd in ("validate", "run"):
        mods = _modules_after(f"from spd_cluster.cli import main\nassert main([{cmd!r}, {str(bad)!r}]) == 2")
        assert not mods & set(HEAVY), (cmd, mods & set(HEAVY))


# -- validate ----------------------------------------------------------------------------------

def test_validate_prints_every_check_and_loads_nothing(tiny, tmp_path, monkeypatch, capsys):
    import transformers

    def no(*a, **k):
        raise AssertionError("validate must not load weights or start Ray")

    monkeypatch.setattr(runtime, "init_ray", no)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no)
    ds = write_jsonl(tmp_path / "d.jsonl", [{"id": i, "prompt": p} for i, p in enumerate(GOOD[:6])])
    good = write_cfg(tmp_path / "good.yaml", make_cfg(tiny, ds, tmp_path / "out" / "deep"))
    assert validate_main(str(good)) == 0
    text = capsys.readouterr().out
    for name in ("config", "dataset", "rows", "output", "models", "resources"):
        assert f"ok       {name}" in text, text
    assert "6 rows (jsonl)" in text and "new" in text and "2 target actor(s) x {CPU: 1} = {CPU: 2}" in text
    assert not (tmp_path / "out").exists()  # proven writable without being made

    # a draft whose vocabulary is another, a missing prompt column, 64 CPUs per actor on this machine
    from tiny import tiny_model

    other = tmp_path / "other"
    tiny_model(vocab=96).save_pretrained(other)
    assert validate_main(str(good), ["mode=draft", f"draft.model={other}", "dataset.prompt_column=text",
                                     "cluster.cpus_per_actor=64"]) == 2
    text = capsys.readouterr().out
    assert "PROBLEM  dataset    " in text and "no row has the key 'text'" in text
    assert "PROBLEM  models     " in text and "vocabulary of 96 tokens" in text
    assert "ok       resources" in text and "actors share them" in text
    assert "2 problems" in text
    # a config error is one problem, exit 2
    assert validate_main(str(good), ["spd.ctx_len=8"]) == 2
    assert "PROBLEM  config" in capsys.readouterr().out

    # cuda: here without a GPU that is a problem, and `run` refuses it the same way before Ray starts
    import torch

    if torch.cuda.device_count() == 0:
        assert validate_main(str(good), ["target.device=cuda"]) == 2
        assert "PROBLEM  resources  device cuda: no GPU visible here" in capsys.readouterr().out
        assert run_main(str(good), ["target.device=cuda"], progress=False) == 2
        assert "device cuda: no GPU visible here" in capsys.readouterr().err


def test_an_hf_id_neither_cached_nor_reachable_fails_fast(tmp_path):
    """No retries for minutes: the local HF cache, then one short request. Offline (HF_HUB_OFFLINE)
    nothing is asked at all. The "hub" here is a closed port on 127.0.0.1: nothing leaves the machine."""
    repo = "spd-cluster-tests/no-such-model"
    code = ("from spd_cluster.cluster.preflight import locate_model\n"
            f"try:\n    locate_model({repo!r}, True)\nexcept Exception as e:\n    print(e)")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]  # bound, never listening: connections are refused
        unreachable = dict(os.environ, HF_ENDPOINT=f"http://127.0.0.1:{closed}", HF_HOME=str(tmp_path / "hf0"))
        unreachable.pop("HF_HUB_OFFLINE", None)
        t0 = time.perf_counter()
        out = subprocess.run([sys.executable, "-c", code], env=unreachable, capture_output=True, text=True,
                             timeout=120).stdout
    assert "is not in the local HF cache" in out and "the hub cannot be reached" in out, out
    assert time.perf_counter() - t0 < 15  # transformers alone: 5 retries, ~25 s here
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    code = ("from spd_cluster.cluster.preflight import locate_model\n"
            f"try:\n    locate_model({repo!r}, True)\nexcept Exception as e:\n    print(e)")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120).stdout
    assert "is not in the local HF cache" in out and "HF_HUB_OFFLINE is set" in out and "hf download" in out
    # cached: found there, read from the snapshot directory (no request)
    snap = tmp_path / "hf" / "hub" / "models--spd-cluster-tests--cached" / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    (snap / "config.json").write_text("{}")
    (snap.parents[1] / "refs").mkdir()
    (snap.parents[1] / "refs" / "main").write_text("0" * 40)
    code = ("from spd_cluster.cluster.preflight import locate_model\n"
            "print(locate_model('spd-cluster-tests/cached', True)[0])")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == str(snap), out.stderr[-2000:]


# -- status: the driver's liveness -------------------------------------------------------------

def test_status_tells_a_gone_driver_from_a_live_one():
    me = status_mod.driver_record()
    assert status_mod.driver_gone({"driver": me}) is None
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    rec = dict(me, pid=dead.pid, start_time=me["start_time"])
    assert "is gone" in status_mod.driver_gone({"driver": rec})
    # the pid alive but another process (reused): its start time differs
    assert "another process" in status_mod.driver_gone({"driver": dict(me, start_time=me["start_time"] - 100)})
    # seen from another machine: the heartbeat decides
    far = dict(me, host="elsewhere")
    now = time.time()
    assert status_mod.driver_gone({"driver": far, "heartbeat_at": now - 5}, now) is None
    assert "no heartbeat" in status_mod.driver_gone({"driver": far, "heartbeat_at": now - 600}, now)


def test_progress_moves_per_prompt_with_tokens_rate_acceptance():
    recs = {0: {"num_prompts": 4, "num_errors": 1, "num_row_steps": 10, "mean_num_accepted_tokens": 2.0}}
    p = Progress("t", 10, recs, enabled=True)
    assert p.bar.n == 4 and p.errors == 1
    p.started()
    time.sleep(0.05)
    p.shard({"num_prompts": 1, "num_errors": 0, "num_generated_tokens": 7, "num_row_steps": 3,
             "num_accepted_tokens": 9, "first_error": None})
    assert p.bar.n == 5 and p.tokens_run == 7 and p.prompts_run == 1
    p.shard({"num_prompts": 1, "num_errors": 1, "num_generated_tokens": 0, "first_error": "'x': bad"})
    post = p.bar.postfix
    assert p.bar.n == 6 and "7 tok" in post and "tok/s" in post and "acc 2.23" in post and "errors 2" in post
    assert p.first_error == "'x': bad"
    p.close()


def test_resume_command_never_overwrites():
    assert resume_command(["spd-cluster", "run"], "c.yaml", ["output.overwrite=true", "cluster.num_pairs=2"], True) \
        == "spd-cluster run c.yaml --set cluster.num_pairs=2 --set output.overwrite=false"
    assert resume_command(["spd-cluster", "run"], "my job.yaml", ["a=b c"], False) == "spd-cluster run 'my job.yaml' --set 'a=b c'"


# -- local Ray in this process -----------------------------------------------------------------

@pytest.mark.slow
def test_the_bar_moves_prompt_by_prompt_within_a_shard(tiny, local_ray, tmp_path, monkeypatch):
    """One shard of 8 prompts on one slot: the driver asks the busy pair what it has finished and
    the bar moves before the shard's result arrives; the result then takes those counts' place."""
    from spd_cluster.cluster.progress import Progress

    monkeypatch.setattr(coordinator, "LIVE_EVERY_S", 0.02)
    seen = []
    live = Progress.live

    def record(self, pair_id, prompts, *rest):
        seen.append((prompts, self.bar.n))
        live(self, pair_id, prompts, *rest)

    monkeypatch.setattr(Progress, "live", record)
    ds = write_jsonl(tmp_path / "d.jsonl", [{"id": i, "prompt": p} for i, p in enumerate(GOOD[:8])])
    cfg = make_cfg(tiny, ds, tmp_path / "out", **{"cluster.num_pairs": 1, "cluster.shard_size": 8,
                                                   "spd.full_batch_size": 1, "spd.max_new_tokens": 24,
                                                   "audit.fraction": 0})
    res = coordinator.run_job(cfg, progress=True)
    assert res.status == "completed" and res.shards_run == 1
    within = [n for n, _ in seen if 0 < n < 8]
    assert within and within == sorted(within), seen  # counts rise within the shard
    assert all(bar == n_before for (_, bar), n_before in zip(seen, [0] + [n for n, _ in seen][:-1]))


@pytest.mark.slow
def test_a_run_that_wrote_no_shard_never_blocks_the_corrected_one(tiny, local_ray, tmp_path, capsys):
    ds = write_jsonl(tmp_path / "d.jsonl", [{"id": i, "prompt": p} for i, p in enumerate(GOOD[:4])])
    broken = tmp_path / "broken"  # a model directory without weights: the actor fails to load it
    broken.mkdir()
    shutil.copy(Path(tiny) / "config.json", broken / "config.json")
    out = tmp_path / "out"
    over = {"cluster.num_pairs": 1, "cluster.max_retries": 0}
    with pytest.raises(coordinator.JobError, match="failed to load"):
        coordinator.run_job(make_cfg(tiny, ds, out, **{"target.model": str(broken)}, **over), progress=False)
    assert json.loads((out / "job.json").read_text())["status"] == "failed"
    fixed = write_cfg(tmp_path / "fixed.yaml", make_cfg(tiny, ds, out, **over))
    assert validate_main(str(fixed)) == 0
    assert "new (replaces the job.json of a failed run that wrote no shard)" in capsys.readouterr().out
    res = coordinator.run_job(make_cfg(tiny, ds, out, **over), progress=False)
    assert res.status == "completed" and res.shards_run == 1
    job = json.loads((out / "job.json").read_text())
    assert len(job["runs"]) == 1 and job["config"]["target"]["model"] == tiny  # the failed job is gone
    # the same config resumed after it failed before writing anything keeps its runs
    out2 = tmp_path / "out2"
    cfg2 = make_cfg(tiny, ds, out2, **over)
    rio.check_writable(out2)
    rio.write_job_json(out2, {"status": "failed", "config_hash": cfg2.identity_hash(
        scan(str(ds), "prompt", "id").sha256), "runs": [{"status": "failed", "wall_s": 0.0}]})
    res = coordinator.run_job(cfg2, progress=False)
    assert res.status == "completed" and len(json.loads((out2 / "job.json").read_text())["runs"]) == 2


@pytest.mark.slow
def test_max_error_fraction_fails_the_job_and_keeps_what_was_written(tiny, local_ray, tmp_path, capsys):
    long = "the quick brown fox " * 60  # longer than ctx_len: an error row from the engine
    rows = [{"id": i, "prompt": long if i in (3, 5, 6) else GOOD[i]} for i in range(8)]
    ds = write_jsonl(tmp_path / "d.jsonl", rows)
    cfg = write_cfg(tmp_path / "job.yaml", make_cfg(tiny, ds, tmp_path / "out", **{"cluster.num_pairs": 1,
                                                                                     "audit.fraction": 0}))
    assert run_main(str(cfg), progress=False) == 1  # default 0.1: at most 0 of 8 rows
    err = capsys.readouterr().err
    assert "job failed: " in err and "of 8 rows are errors" in err and "more than max_error_fraction 0.1" in err
    assert "ctx_len=128 leaves no room" in err  # the first error, named
    job = json.loads((tmp_path / "out" / "job.json").read_text())
    assert job["status"] == "failed" and "rows are errors" in job["error"]
    kept = pd.read_parquet(tmp_path / "out" / "results")
    assert len(kept) == 4 * job["shards_done"] < 8 and (kept.finish_reason == "error").sum() >= 1  # stopped early
    st = status_mod.job_status(tmp_path / "out")
    assert st["state"] == "failed" and "rows are errors" in st["error"]
    # the same job allowed more errors resumes and completes (the threshold is not part of its identity)
    assert run_main(str(cfg), ["max_error_fraction=0.5"], progress=False) == 0
    assert len(pd.read_parquet(tmp_path / "out" / "results")) == 8
    # rows the driver already knows cannot run are refused before anything starts
    dup = write_jsonl(tmp_path / "dup.jsonl", [{"id": 1, "prompt": p} for p in GOOD[:4]])
    bad = write_cfg(tmp_path / "dup.yaml", make_cfg(tiny, dup, tmp_path / "out3"))
    assert validate_main(str(bad)) == 2 and "PROBLEM  rows       " in capsys.readouterr().out
    assert run_main(str(bad), progress=False) == 2
    assert "3 of 4 rows cannot run" in capsys.readouterr().err and not (tmp_path / "out3" / "job.json").exists()


# -- real `spd-cluster run` processes: kill -9, Ctrl-C, SIGTERM, resume ------------------------

def _start(cfg: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    # its own session: a signal to the group reaches the driver and the local Ray it starts, as
    # Ctrl-C in a terminal does
    return subprocess.Popen([str(BIN / "spd-cluster"), "run", str(cfg), "--no-progress"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def _wait_shards(out: Path, n: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while len(rio.written_shards(out)) < n:
        if proc.poll() is not None:
            pytest.fail(f"the job ended early ({proc.returncode}): {proc.stderr.read()[-3000:]}")
        if time.time() > deadline:
            pytest.fail("no shard written in time")
        time.sleep(0.2)


def _wait_for_job(out: Path, ok, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while not ok(rio.read_job_json(out) or {"runs": [{}]}):
        if proc.poll() is not None or time.time() > deadline:
            pytest.fail(f"job.json did not get there in time (job ended: {proc.poll()})")
        time.sleep(0.1)


def _reap(proc: subprocess.Popen) -> None:
    """Nothing of that process group outlives the test (its driver, its Ray)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    left = [p for p in psutil.process_iter() if _sid(p) == proc.pid]
    for p in left:
        p.kill()
    psutil.wait_procs(left, timeout=30)


def _sid(p) -> int | None:
    try:
        return os.getsid(p.pid)
    except OSError:
        return None


@pytest.mark.slow
def test_kill_cancel_terminate_resume(tiny, tmp_path):
    n = 24
    ds = write_jsonl(tmp_path / "d.jsonl", [{"id": i, "prompt": GOOD[i % len(GOOD)]} for i in range(n)])
    out = tmp_path / "out"
    cfg = write_cfg(tmp_path / "job.yaml", make_cfg(tiny, ds, out, mode="baseline", **{
        "spd.max_new_tokens": 400, "spd.ctx_len": 512, "spd.ignore_eos": "true", "cluster.shard_size": 2,
        "cluster.num_pairs": 1}))  # shards long enough for a signal to land mid-job on a fast machine
    runs_cmd = f"spd-cluster run {cfg}"

    # 1. kill -9 the driver (and its Ray) after two shards: status says interrupted, not running
    p = _start(cfg)
    try:
        _wait_shards(out, 2, p)
        st = status_mod.job_status(out)
        assert st["state"] == "running" and st["shards_total"] == 12 and st["prompts_done"] >= 4
        # the pairs write the shard files; the driver's job.json follows within JOB_WRITE_EVERY_S
        _wait_for_job(out, lambda j: j["runs"][0].get("shards_run", 0) >= 2, p)
        os.killpg(p.pid, signal.SIGKILL)
        p.wait(timeout=60)
    finally:
        _reap(p)
    st = status_mod.job_status(out)
    assert st["state"] == "interrupted" and "is gone" in st["why"] and st["resume"] == runs_cmd
    killed = json.loads((out / "job.json").read_text())["runs"][0]
    assert killed["wall_s"] > 0 and killed["shards_run"] >= 2  # written with its last shard
    text = subprocess.run([str(BIN / "spd-cluster"), "status", str(out)], capture_output=True, text=True).stdout
    assert "interrupted" in text and f"resume   {runs_cmd}" in text

    # 2. Ctrl-C (SIGINT to the whole process group, as a terminal sends it): cancelled, exit 130
    for run_no, (sig, code) in enumerate(((signal.SIGINT, 130), (signal.SIGTERM, 143)), start=2):
        before = len(rio.written_shards(out))
        p = _start(cfg)
        try:
            # this run's driver is past its start (Ray up: job.json of this run names it), then a
            # shard of this run is written
            _wait_for_job(out, lambda j: len(j["runs"]) == run_no and "ray" in j, p, timeout=300)
            _wait_shards(out, len(rio.written_shards(out)) + 1, p)
            os.killpg(p.pid, sig)
            _, err = p.communicate(timeout=120)
        finally:
            _reap(p)
        assert p.returncode == code, err[-3000:]
        assert "Traceback" not in err
        lines = [ln for ln in err.splitlines() if "resume" in ln]
        assert len(lines) == 1 and lines[0].endswith(f"resume with: {runs_cmd}"), err[-3000:]
        assert f"cancelled ({sig.name}): " in lines[0]
        job = json.loads((out / "job.json").read_text())
        assert job["status"] == "cancelled" and job["runs"][-1]["status"] == "cancelled", (json.dumps(job)[-1500:], err[-2000:])
        assert job["error"] == f"cancelled by {sig.name}"
        # every written shard kept; a pair may finish writing the one it ran as the driver stops
        # (the driver counted it or not: a resume reads its file either way)
        records, stale = rio.load_records(out)
        assert len(records) == len(rio.written_shards(out)) >= job["shards_done"] >= before + 1 and not stale
        assert status_mod.job_status(out)["state"] == "cancelled"

    # 3. the last run finishes it; every run is on record and the wall time is all of theirs
    p = _start(cfg)
    try:
        stdout, err = p.communicate(timeout=600)
    finally:
        _reap(p)
    assert p.returncode == 0, err[-3000:]
    job = json.loads((out / "job.json").read_text())
    assert [r["status"] for r in job["runs"]] == ["interrupted", "cancelled", "cancelled", "completed"]
    walls = [r["wall_s"] for r in job["runs"]]
    last = job["runs"][-1]
    assert all(w > 0 for w in walls[:3]) and last["shards_skipped"] + last["shards_run"] == 12 and last["shards_skipped"]
    assert all(r["placement"]["num_pairs"] == 1 and r["driver"]["pid"] for r in job["runs"])
    assert job["wall_time_s"] == pytest.approx(sum(walls), abs=1e-3)
    ex = pd.read_parquet(out / "exec_info.parquet").iloc[0]
    assert ex.e2e_time == pytest.approx(job["wall_time_s"], rel=1e-6)
    assert ex.e2e_throughput == pytest.approx(ex.num_generated_tokens / job["wall_time_s"], rel=1e-6)
    df = pd.read_parquet(out / "results")
    assert sorted(df.row) == list(range(n)) and df.error.isna().all()  # each prompt once
    st = status_mod.job_status(out)
    assert st["state"] == "completed" and st["shards_done"] == 12 and st["prompts_done"] == n and st["eta_s"] is None
    assert st["tokens"] == df.num_generated_tokens.sum() == ex.num_generated_tokens
    assert st["tokens_per_s"] == pytest.approx(ex.e2e_throughput, rel=1e-3)


def test_a_pair_prefetches_only_what_no_idle_pair_needs():
    """Each pair takes a shard when it holds none and a next one while more shards wait than the
    other pairs with nothing to run: at a job's tail the last shards go to the idle pairs."""
    from collections import deque
    from types import SimpleNamespace as NS

    run = coordinator._Run.__new__(coordinator._Run)
    busy, starting = NS(state="busy", holding={"r": 0}), NS(state="starting", holding={})
    dead = NS(state="dead", holding={})
    run.pairs, run.retry = [busy, starting, dead], deque()
    run.unsent = 2
    assert run._may_take(busy)  # 2 waiting, 1 pair would idle: one of them may wait behind the busy one
    run.unsent = 1
    assert not run._may_take(busy) and not run._may_take(starting)  # the last one is the starting pair's
    starting.state = "ready"
    assert run._may_take(starting)
    run.retry.append(("shard", 2))
    assert run._may_take(busy)  # a re-queued shard counts as waiting too
    busy.holding = {"r": 0, "s": 1}
    assert not run._may_take(busy)  # PREFETCH


def test_a_signal_while_the_driver_writes_its_last_records_waits_for_them():
    """Ctrl-C as a job finishes must not cut the writes that say how it ended (job.json would stay
    'running'): while held, the CLI's handler notes the signal; outside, it raises at once."""
    from spd_cluster.cluster.cli import _handle_signals
    from spd_cluster.cluster.errors import JobCancelled

    restore = _handle_signals()
    try:
        with JobCancelled.held():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)  # the handler runs here, in the main thread, and must not raise
        assert JobCancelled.received == signal.SIGINT and not JobCancelled.holding
        restore()
        restore = _handle_signals()
        with pytest.raises(JobCancelled):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)
    finally:
        restore()
