"""The figures an analyst reads, checked on a real job's output: real Ray on 127.0.0.1, real
Parquet, duckdb for the README's queries. One job (2 pairs, 3 shards, an audit) is run once for
the module; a no-op resume with another num_pairs follows it.
"""

from __future__ import annotations

import os

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # before Ray is imported: loopback everywhere
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import json  # noqa: E402
import re  # noqa: E402
from pathlib import Path  # noqa: E402

import duckdb  # noqa: E402
import pandas as pd  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import pytest  # noqa: E402
import ray  # noqa: E402

from spd_cluster import report  # noqa: E402
from spd_cluster import status as status_mod  # noqa: E402
from spd_cluster.cluster.coordinator import run_job  # noqa: E402
from spd_cluster.engine.metrics import SpDPerfMetrics  # noqa: E402
from spd_cluster.io import results as rio  # noqa: E402
from helpers import GOOD, make_cfg, write_jsonl  # noqa: E402 - tiny: a fixture (conftest.py)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def job(tiny, tmp_path_factory):  # noqa: F811 - the imported fixture
    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=False, num_cpus=4,
             logging_level="WARNING")
    try:
        d = tmp_path_factory.mktemp("figures")
        ds = write_jsonl(d / "in.jsonl", [{"id": f"p{i}", "prompt": p} for i, p in enumerate(GOOD)]
                         + [{"id": "dup", "prompt": "x"}, {"id": "dup", "prompt": "duplicate id"}])
        out = d / "out"
        cfg = make_cfg(tiny, ds, out, **{"audit.fraction": 0.5, "audit.min_prompts": 4})
        res = run_job(cfg, progress=False)
        first = {"exec_info": pd.read_parquet(out / "exec_info.parquet"),
                 "job": json.loads((out / "job.json").read_text())}
        # a no-op resume (every shard written) with another num_pairs: nothing runs
        res2 = run_job(make_cfg(tiny, ds, out, **{"audit.fraction": 0.5, "audit.min_prompts": 4,
                                                  "cluster.num_pairs": 1}), progress=False)
        yield {"out": out, "res": res, "res2": res2, **first}
    finally:
        ray.shutdown()


def _readme_sql(marker: str) -> str:
    """The README's duckdb statement whose text contains ``marker`` (its triple-quoted SQL)."""
    text = (REPO / "README.md").read_text()
    for sql in re.findall(r'duckdb\.sql\("""(.*?)"""\)', text, flags=re.S):
        if marker in sql:
            return sql
    raise AssertionError(f"no duckdb query with {marker!r} in README.md")


@pytest.mark.slow
def test_readme_accepted_per_step_reproduces_the_jobs_figure(job):
    out, ex = job["out"], job["exec_info"]
    want = float(ex.mean_num_accepted_tokens[0])
    assert want > 1.0
    sql = _readme_sql("accepted_per_step").replace("out/demo", str(out))
    per_pair = duckdb.sql(sql).df()
    # the README's per-pair query, summed back over the pairs, is the job's figure exactly
    acc, steps = per_pair.accepted_tokens.sum(), per_pair.steps.sum()
    assert acc / steps == want
    whole = duckdb.sql(_readme_sql("AS job_accepted_per_step").replace("out/demo", str(out))).df().iloc[0, 0]
    assert whole == want
    # and each pair's figure is its own tokens / steps (not a mean of per-prompt means)
    df = pd.read_parquet(out / "results")
    ok = df[df.finish_reason != "error"]
    for p, g in ok.groupby("pair_id"):
        row = per_pair.set_index("pair_id").loc[p]
        assert row.accepted_per_step == g.num_accepted_tokens.sum() / g.num_decode_iterations.sum()
    assert (ok.num_accepted_tokens == (ok.mean_num_accepted_tokens * ok.num_decode_iterations).round()).all()


@pytest.mark.slow
def test_pair_busy_time_and_tokens_per_s_exclude_the_audit(job):
    out, ex = job["out"], job["exec_info"]
    sh = pd.read_parquet(out / "shards.parquet")
    au = pd.read_parquet(out / "audit.parquet")
    audited = set(au.shard_id)
    assert audited and (sh.set_index("shard_id").loc[sorted(audited), "audit_s"] > 0).all()
    assert (sh[~sh.shard_id.isin(audited)].audit_s == 0).all()
    assert sh.busy_s.tolist() == pytest.approx((sh.wall_s - sh.audit_s).tolist())
    assert (sh.busy_s >= sh.e2e_time * 0.99).all()  # the shard's own generate is in its busy time
    assert ex.audit_time_s[0] == pytest.approx(sh.audit_s.sum()) and ex.audit_time_s[0] > 0
    fig = report.compute(report.load_job(out))
    pairs = fig.pairs.set_index("pair_id")
    for p, g in sh.groupby("pair_id"):
        assert pairs.loc[p, "busy_s"] == pytest.approx(g.busy_s.sum())
        assert pairs.loc[p, "tokens_per_s"] == pytest.approx(g.num_generated_tokens.sum() / g.busy_s.sum())
    # the README's per-pair tokens/s query gives the same
    q = duckdb.sql(_readme_sql("tokens_per_s").replace("out/demo", str(out))).df().set_index("pair_id")
    for p in pairs.index:
        assert q.loc[p, "tokens_per_s"] == pytest.approx(pairs.loc[p, "tokens_per_s"])


@pytest.mark.slow
def test_job_wall_time_counts_actor_startup_and_reports_it_apart(job):
    js, ex, res = job["job"], job["exec_info"], job["res"]
    run = js["runs"][-1]
    assert run["actor_startup_s"] > 0 and run["wall_s"] > run["actor_startup_s"]
    assert run["audit_s"] == pytest.approx(ex.audit_time_s[0], abs=1e-3)
    assert ex.actor_startup_s[0] == pytest.approx(run["actor_startup_s"], abs=1e-3)
    # the wall time runs from the run's start: start-up + first dispatch to the last result
    sh = pd.read_parquet(job["out"] / "shards.parquet")
    assert run["wall_s"] >= run["actor_startup_s"] + sh.groupby("pair_id").wall_s.sum().max() - 0.05
    # e2e_time, what e2e_throughput divides by, is the wall time less the audit's share of it
    audit_wall = 0.0 if pd.isna(ex.audit_wall_time_s[0]) else ex.audit_wall_time_s[0]
    assert ex.e2e_time[0] + audit_wall == pytest.approx(res.wall_time_s) == pytest.approx(js["wall_time_s"])
    assert ex.e2e_throughput[0] == pytest.approx(ex.num_generated_tokens[0] / ex.e2e_time[0])
    # a no-op resume adds nothing, and keeps the sum over runs
    js2 = json.loads((job["out"] / "job.json").read_text())
    assert len(js2["runs"]) == 2 and js2["runs"][-1]["wall_s"] == 0 and js2["runs"][-1]["actor_startup_s"] == 0
    assert js2["wall_time_s"] == pytest.approx(sum(r["wall_s"] for r in js2["runs"]))
    assert job["res2"].wall_time_s == pytest.approx(res.wall_time_s, abs=1e-3)  # runs keep ms
    assert pd.read_parquet(job["out"] / "exec_info.parquet").actor_startup_s[0] == pytest.approx(
        run["actor_startup_s"], abs=1e-3)


@pytest.mark.slow
def test_num_pairs_comes_from_the_records(job):
    out = job["out"]
    ran = set(pd.read_parquet(out / "results").pair_id)
    assert ran == {0, 1}
    assert job["exec_info"].num_pairs[0] == 2
    ex2 = pd.read_parquet(out / "exec_info.parquet")  # after the no-op resume with num_pairs=1
    assert job["res2"].shards_run == 0
    assert ex2.num_pairs[0] == 2 and ex2.num_pairs_configured[0] == 1


@pytest.mark.slow
def test_per_prompt_figures_are_in_results_by_prompt_id(job):
    out, res = job["out"], job["res"]
    ex_cols = set(pq.read_schema(out / "exec_info.parquet").names)
    per_prompt = {f.name for f in SpDPerfMetrics.__dataclass_fields__.values() if f.metadata.get("per_prompt")}
    assert per_prompt >= {"ttft_per_prompt", "num_accepted_tokens_per_prompt", "generated_tokens_per_prompt"}
    assert not per_prompt & ex_cols  # aggregates only
    assert not per_prompt & set(pq.read_schema(out / "shards.parquet").names)
    df = pd.read_parquet(out / "results").set_index("prompt_id")
    ok = df[df.finish_reason != "error"]
    assert (ok.ttft_s > 0).all() and (ok.num_generated_tokens > 0).all()
    # nor in the shard records (the footers a resume reads), nor the job's ExecInfo and its print
    for loc in rio.written_shards(out).values():
        assert not per_prompt & set(rio.read_shard_record(loc))
    m = res.exec_info.perf_metrics
    assert m.generated_tokens_per_prompt == m.ttft_per_prompt == m.num_accepted_tokens_per_prompt == []
    assert m.num_generated_tokens == df.num_generated_tokens.sum()
    assert f"Total Generated Tokens = {m.num_generated_tokens}" in str(res.exec_info) and "[" not in str(res.exec_info)
    # audit rows join the results by prompt_id
    au = pd.read_parquet(out / "audit.parquet").set_index("prompt_id")
    assert au.spd_num_tokens.tolist() == ok.loc[au.index, "num_generated_tokens"].tolist()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["results/shard-00000.parquet", "shards.parquet", "exec_info.parquet",
                                  "audit.parquet"])
def test_every_column_has_a_description_and_durations_a_unit(job, name):
    schema = pq.read_schema(job["out"] / name)
    for f in schema:
        md = f.metadata or {}
        assert md.get(b"description"), (name, f.name)
        assert b"unit" in md, (name, f.name)
        if f.name.endswith("_s") or f.name.endswith("_time") or f.name in ("mean_ttft", "batch_ttft"):
            assert md[b"unit"] == b"s", (name, f.name)
        if f.name.endswith("throughput"):
            assert md[b"unit"] == b"tokens/s", (name, f.name)
    assert schema.field("e2e_time" if name != "results/shard-00000.parquet" and name != "audit.parquet"
                        else schema.names[0]).metadata
    # one definition: the written schema is the module's (names, types, metadata)
    want = {"results/shard-00000.parquet": rio.RESULTS_SCHEMA, "shards.parquet": rio.SHARDS_SCHEMA,
            "exec_info.parquet": rio.EXEC_INFO_SCHEMA, "audit.parquet": rio.AUDIT_SCHEMA}[name]
    assert [(f.name, f.metadata) for f in schema] == [(f.name, f.metadata) for f in want]


@pytest.mark.slow
def test_one_throughput_in_exec_info_the_summary_status_and_the_report(job):
    """The job's e2e throughput is one figure wherever it is printed: generated tokens / (job wall
    time less the audit's share of it), engine/reduce.py's; decode throughput is one pair's, decode
    tokens / decode pair-seconds. (Before, one job showed four: exec_info over the wall time with
    the audit, `status` the same, the report's pairs over busy time, the print without a unit.)"""
    out, res = job["out"], job["res"]
    ex = pd.read_parquet(out / "exec_info.parquet").iloc[0]  # after the no-op resume: the same job
    js = json.loads((out / "job.json").read_text())
    sh = pd.read_parquet(out / "shards.parquet")
    wall, startup = js["wall_time_s"], sum(r["actor_startup_s"] for r in js["runs"])
    audit_wall = (wall - startup) * sh.audit_s.sum() / sh.wall_s.sum()
    assert ex.audit_time_s > 0 and ex.audit_wall_time_s == pytest.approx(audit_wall, rel=1e-4) and audit_wall > 0
    assert ex.e2e_time == pytest.approx(wall - audit_wall, rel=1e-4)
    assert ex.e2e_throughput == pytest.approx(ex.num_generated_tokens / (wall - audit_wall), rel=1e-4)
    assert ex.decode_throughput == pytest.approx(sh.num_decode_tokens.sum() / sh.decode_time.sum())
    # the summary `spd-cluster run` prints (the job's ExecInfo), with units and the audit apart
    first = job["exec_info"].iloc[0]
    text = str(res.exec_info)
    assert f"E2E Throughput = {round(first.e2e_throughput, 2)} tokens/s ({first.num_generated_tokens} tokens / " \
           f"{first.e2e_time:.2f} s)" in text
    assert f"Decode Throughput = {round(first.decode_throughput, 2)} tokens/s per pair" in text
    assert f"audit {first.audit_wall_time_s:.2f} s, not in the throughputs" in text
    # `status`, and the report (from exec_info, and from the records as while the job ran)
    st = status_mod.job_status(out)
    assert st["tokens_per_s"] == pytest.approx(ex.e2e_throughput, rel=1e-4)
    assert st["decode_tokens_per_s"] == pytest.approx(ex.decode_throughput)
    fig = report.compute(report.load_job(out))
    assert fig.e2e_throughput == ex.e2e_throughput and fig.decode_throughput == ex.decode_throughput
    assert fig.wall_s == pytest.approx(wall) and fig.audit_wall_s == ex.audit_wall_time_s
    live = report.load_job(out)
    live.job, live.exec_info = {**live.job, "status": "running"}, None
    again = report.compute(live)
    assert again.aggregate_source.endswith("shard record(s) so far") and not again.wall_approx
    assert again.e2e_throughput == pytest.approx(ex.e2e_throughput, rel=1e-4)
    assert again.decode_throughput == pytest.approx(ex.decode_throughput)
