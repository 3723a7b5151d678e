"""`spd-cluster report`: PNGs + HTML + terminal table from a job's output directory.

The job output is made without Ray: a tiny random llama runs the in-process engine over each
shard (as a target actor would), and the real writers of spd_cluster/io/results.py put rows,
shard records, shards.parquet, exec_info.parquet and job.json on disk the way the coordinator
does. The audit file follows issue 7's columns, built from a baseline run of the same prompts.
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tiny import VOCAB, tiny_model

from spd_cluster import report
from spd_cluster import status as status_mod
from spd_cluster.cluster.actors import _result_row
from spd_cluster.engine.reduce import metrics_from_record, reduce_metrics
from spd_cluster.engine import SpDEngine, SpDSettings
from spd_cluster.io import results as rio
from spd_cluster.sessions.torch_session import TorchSession

K, FBS, CTX, SHARD = 3, 2, 128, 3
PNG_SIG = b"\x89PNG\r\n\x1a\n"


def _prompts() -> list[list[int]]:
    g = np.random.default_rng(11)
    ps = [g.integers(3, VOCAB, size=n).tolist() for n in (6, 14, 9, 4, 11, 7, 20, 5)]
    ps += [ps[1][:5] * 4, ps[4][:3] * 5]  # self-repeating: prompt lookup finds something
    return ps


@pytest.fixture(scope="module")
def job_run():
    """Run the engine shard by shard (pld, then baseline on the same prompts for the audit)."""
    model = tiny_model("llama", seed=0)
    prompts = _prompts()
    settings = SpDSettings(num_speculative_tokens=K, prefill_seq_len=8, ctx_len=CTX, max_new_tokens=20,
                           full_batch_size=FBS, ignore_eos=True,
                           # fixed k: the report's figures, not adaptive k's timing, are under test (on a
                           # busy machine the step costs timed at load can price prompt lookup out)
                           adaptive_k=False)

    def run(mode):
        eng = SpDEngine(mode, TorchSession(model, FBS, CTX), None, settings, eos_token_ids=[2])
        shards = []
        for sid, first in enumerate(range(0, len(prompts), SHARD)):
            ids = [f"p{i}" for i in range(first, min(first + SHARD, len(prompts)))]
            shards.append((sid, first, ids, eng.generate(prompts[first:first + len(ids)], ids)))
        return shards

    return {"prompts": prompts, "settings": settings, "pld": run("pld"), "baseline": run("baseline")}


def write_job(out: Path, job_run, *, shards=None, finished=True, audit_mismatch=None, mode="pld") -> Path:
    """Write a job output directory like the coordinator does; `shards` limits which shards are
    written (a job still running); `audit_mismatch` is a prompt index whose SpD output is altered
    in the audit (None: no audit.parquet)."""
    t0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
    records, clock = [], {0: 0.0, 1: 0.0}
    for sid, first, ids, info in job_run[mode]:
        if shards is not None and sid not in shards:
            continue
        pair = sid % 2
        m = info.perf_metrics
        wall = m.e2e_time + 0.05
        clock[pair] += wall
        rows = [{**_result_row(r), "row": first + i, "prompt": repr(info.prompts[i]), "shard_id": sid,
                 "pair_id": pair} for i, r in enumerate(info.results)]
        rec = {"shard_id": sid, "first_row": first, "num_prompts": len(rows), "num_errors": 0, "pair_id": pair,
               "node_id": "n0", "attempts": 1 + (sid == 1), "wall_s": wall,
               "finished_at": (t0 + timedelta(seconds=clock[pair])).isoformat(timespec="seconds"),
               **rio.metrics_record(m)}
        rio.write_shard(out, sid, rows, rec)
        records.append(rec)
    num_shards = len(job_run["pld"])
    s = job_run["settings"]
    job = {"name": "tiny", "status": "completed" if finished else "running",
           "config": {"name": "tiny", "mode": mode, "target": {"model": "tiny-llama", "dtype": "float32"},
                      "spd": s.model_dump(), "cluster": {"num_pairs": 2, "shard_size": SHARD}},
           "dataset": {"path": "prompts.jsonl", "num_rows": len(job_run["prompts"])}, "num_shards": num_shards,
           "started_at": t0.isoformat(), "ended_at": None, "versions": {"python": "3.11"}, "runs": [{}]}
    rio.write_job_json(out, job)
    if finished:
        wall = max(clock.values())
        metrics = reduce_metrics([metrics_from_record(r) for r in records], wall)
        rio.write_shards_table(out, records)
        rio.write_exec_info(out, {"name": "tiny", "mode": mode, "target_model_name": "tiny-llama",
                                  "draft_model_name": "", "num_speculative_tokens": K, "ctx_len": CTX,
                                  "full_batch_size": FBS, "num_prompts": len(job_run["prompts"]),
                                  "num_errors": 0, "num_shards": num_shards, "num_pairs": 2,
                                  **rio.metrics_record(metrics)})
    if audit_mismatch is not None:
        write_audit(out, job_run, audit_mismatch, with_exec_info=finished)
    return out


def write_audit(out: Path, job_run, mismatch: int, with_exec_info: bool) -> None:
    rows = []
    for (sid, _, ids, spd), (_, _, _, base) in zip(job_run["pld"], job_run["baseline"]):
        spd_tpt = spd.perf_metrics.e2e_time / max(1, spd.perf_metrics.num_generated_tokens)
        base_tpt = base.perf_metrics.e2e_time / max(1, base.perf_metrics.num_generated_tokens)
        for pid, a, b in zip(ids, spd.results, base.results):
            sa, sb = list(a.generated_ids), list(b.generated_ids)
            if pid == f"p{mismatch}":
                sa[3] = (sa[3] + 1) % VOCAB  # the injected mismatch
            diff = next((i for i, (x, y) in enumerate(zip(sa, sb)) if x != y), None)
            rows.append({"prompt_id": pid, "shard_id": sid, "match": sa == sb, "first_diff_position": diff,
                         "spd_token": None if diff is None else sa[diff],
                         "baseline_token": None if diff is None else sb[diff],
                         "spd_time_per_token_s": spd_tpt, "baseline_time_per_token_s": base_tpt})
    rio.write_audit(out, [{**r, "row": i} for i, r in enumerate(rows)])  # the job's writer and schema
    if with_exec_info:  # the aggregate columns the audit fills in exec_info.parquet
        ei = pq.read_table(out / "exec_info.parquet")
        rate = sum(r["match"] for r in rows) / len(rows)
        for name, value in (("audit_match_rate", rate), ("audit_speedup", 1.5)):
            ei = ei.set_column(ei.column_names.index(name), name, pa.array([value]))
        rio.write_parquet_atomic(ei, out / "exec_info.parquet")


def check_page(page: Path, out: Path) -> str:
    text = page.read_text()
    srcs = re.findall(r'<img src="([^"]+)"', text)
    pngs = sorted((out / "report").glob("*.png"))
    assert pngs and len(srcs) == len(pngs)
    assert {(page.parent / s).resolve() for s in srcs} == {p.resolve() for p in pngs}  # every PNG, by path
    import matplotlib.image as mpimg

    for p in pngs:
        assert p.stat().st_size > 0 and p.read_bytes()[:8] == PNG_SIG, p
        img = mpimg.imread(p)
        assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100, p
        assert float(img[..., :3].std()) > 0.01, p  # not a blank canvas
    assert "http://" not in text and "https://" not in text  # self-contained
    return text


def test_a_match_rate_below_one_never_prints_as_100():
    assert report._pct(1.0) == "100.0%" and report._pct(0.75) == "75.0%"
    assert report._pct(9999 / 10000) == "99.99%" and report._pct(1 - 1e-5) == "99.999%"


def test_finished_job(tmp_path, job_run):
    out = write_job(tmp_path / "job", job_run)
    page = report.build_report(out)
    assert page == out / "report.html"
    text = check_page(page, out)
    assert {p.name for p in (out / "report").glob("*.png")} == set(report.PNG.values()) - {"audit.png"}
    assert "no audit" in text
    table = report.terminal_table(out)
    assert "no audit" in table and "exec_info.parquet" in table and "completed" in table
    assert "4 of 4" in table
    rerun = next(ln for ln in table.splitlines() if "re-run after a failure" in ln)
    assert rerun.split("|")[3].strip() == "1"  # shard 1 took two attempts

    # the accepted-tokens-per-step histogram is exact: it equals the engine's own per-step counts
    fig = report.compute(report.load_job(out))
    real = Counter(a for _, _, _, info in job_run["pld"] for r in info.results for a in r.accepted_per_step)
    assert fig.step_source == "exact" and {j: c for j, c in fig.step_counts.items() if c} == dict(real)
    assert sum(real.values()) > 0 and max(real) > 1  # prompt lookup accepted something
    steps = sum(real.values())
    assert fig.mean_accepted == pytest.approx(sum(j * c for j, c in real.items()) / steps)
    assert len(fig.rates) == K and len(fig.ttft) == len(job_run["prompts"])
    edges, rates = report.pair_rates(fig.shard_rows)  # the tokens/s curves hold every token once
    assert set(rates) == {0, 1}
    assert sum(r.sum() for r in rates.values()) * (edges[1] - edges[0]) == pytest.approx(fig.tokens)


def test_baseline_job(tmp_path, job_run):
    out = write_job(tmp_path / "job", job_run, mode="baseline")
    check_page(report.build_report(out), out)
    fig = report.compute(report.load_job(out))
    assert fig.k == 0 and fig.rates == [] and set(k for k, c in fig.step_counts.items() if c) == {1}
    assert "no speculation in this mode" in report.terminal_table(out)


def test_partial_job_still_reports(tmp_path, job_run):
    out = write_job(tmp_path / "job", job_run, shards={0, 2}, finished=False)
    assert not (out / "shards.parquet").exists() and not (out / "exec_info.parquet").exists()
    page = tmp_path / "pages" / "r.html"  # --html elsewhere: the PNGs stay in OUT/report, referred to relatively
    assert report.build_report(out, page) == page
    text = check_page(page, out)
    assert '<img src="../job/report/' in text
    assert "Partial" in text and "no audit" in text
    table = report.terminal_table(out)
    assert "running (partial)" in table and "2 of 4" in table and "shard record(s) so far" in table
    fig = report.compute(report.load_job(out))
    assert fig.prompts_done == 2 * SHARD and fig.e2e_throughput and fig.e2e_throughput > 0
    assert fig.step_source == "exact" and set(fig.shard_rows.shard_id) == {0, 2}


def test_nothing_written_yet(tmp_path, job_run):
    out = write_job(tmp_path / "job", job_run, shards=set(), finished=False)
    check_page(report.build_report(out), out)
    assert "0 of 4" in report.terminal_table(out)


def run_cli(*argv) -> int:
    parser = argparse.ArgumentParser()
    report.add_cli(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["report", *map(str, argv)])
    return args.func(args)


def test_audit_mismatch_shows_match_rate_below_one(tmp_path, job_run, capsys):
    n = len(job_run["prompts"])
    out = write_job(tmp_path / "job", job_run, audit_mismatch=2)
    assert run_cli(out) == 0  # `spd-cluster report OUT`: the table, then the page's path
    printed = capsys.readouterr().out
    assert printed.rstrip().endswith(f"report: {(out / 'report.html').resolve()}")
    text = check_page(out / "report.html", out)
    assert (out / "report" / "audit.png").is_file() and "no audit" not in text
    rate = f"{100 * (n - 1) / n:.1f}%"
    assert f"Match rate <span class=bad>{rate}</span>" in text
    assert "<td>p2</td><td>3</td>" in text  # the mismatched prompt and its first differing position
    assert "1.50x" in text  # exec_info's audit_speedup
    line = next(ln for ln in printed.splitlines() if "match rate" in ln)
    assert rate in line and f"{n - 1}/{n} identical, 1 mismatched" in line
    assert printed.startswith(report.terminal_table(out))
    fig = report.compute(report.load_job(out))
    assert fig.audit["match_rate"] < 1 and fig.audit["matched"] == n - 1

    # a running job with an audit so far: figures from audit.parquet alone; no audit file: "no audit" again
    out2 = write_job(tmp_path / "job2", job_run, shards={0}, finished=False, audit_mismatch=0)
    table2 = report.terminal_table(out2)
    assert f"{rate} ({n - 1}/{n} identical, 1 mismatched)" in table2 and "no audit" not in table2
    assert "| from " in table2 and "audit.parquet " in table2  # speedup computed from the rows themselves
    (out / "audit.parquet").unlink()
    (out / "exec_info.parquet").unlink()
    report.build_report(out)
    assert "no audit" in (out / "report.html").read_text() and not (out / "report" / "audit.png").exists()
    assert run_cli(tmp_path / "nope") == 2


def test_shard_table_shows_where_speculation_paid(tmp_path, job_run):
    """Per shard: tokens per step, the proposal width adaptive k chose and the audit's speedup,
    each the engine's own count for that shard (engine/reduce.py's definitions)."""
    out = write_job(tmp_path / "job", job_run, audit_mismatch=0)
    fig = report.compute(report.load_job(out))
    rows = fig.shard_rows.set_index("shard_id")
    audit = pq.read_table(out / "audit.parquet").to_pandas()
    for sid, _, ids, info in job_run["pld"]:
        m = info.perf_metrics
        steps = [a for r in info.results for a in r.accepted_per_step]
        assert rows.loc[sid, "tokens_per_step"] == pytest.approx(sum(steps) / len(steps))
        assert rows.loc[sid, "proposal_width"] == pytest.approx(sum(m.proposed_per_position) / m.num_row_steps)
        assert rows.loc[sid, "decode_throughput"] == pytest.approx(m.decode_throughput)
        a = audit[audit.shard_id == sid]
        assert rows.loc[sid, "speedup"] == pytest.approx(a.baseline_time_per_token_s.mean() / a.spd_time_per_token_s.mean())
    assert fig.proposal_width == pytest.approx(sum(fig.proposed) / sum(rows.row_steps))
    page = check_page(report.build_report(out), out)
    assert (out / "report" / report.PNG["speculation"]).is_file()
    head = re.search(r"<h2>Shards</h2>.*?<tr>(.*?)</tr>", page, flags=re.S).group(1)
    assert "<th>tokens/step</th><th>proposed/step</th><th>speedup</th>" in head
    r0 = rows.loc[0]
    assert (f"<td class=num>{r0.tokens_per_step:.2f}</td><td class=num>{r0.proposal_width:.2f}</td>"
            f"<td class=num>{r0.speedup:.2f}x</td>") in page
    table = report.terminal_table(out)
    assert "proposal width (proposed tokens / step)" in table and "speculation paused (width 0)" in table
    assert report.summary._width(0.0, K) == "0 (paused)" and report.summary._width(0.0, 0) == "n/a"


def test_a_running_job_reads_the_job_clock_as_status_does(tmp_path, job_run):
    """While a job runs, its throughput is reduce's over the records written so far and the runs'
    wall time in job.json, the audit's share left out: the report and `status` print one figure."""
    out = write_job(tmp_path / "job", job_run, shards={0, 1, 2}, finished=False)
    js = rio.read_job_json(out)
    recs, _ = rio.load_records(out)
    shard_wall = sum(r["wall_s"] for r in recs.values())
    # the audit took a quarter of shard 1's wall time; the run started 2 s before its first shard
    audit_s = recs[1]["wall_s"] / 4
    rec = dict(recs[1], audit_s=audit_s, busy_s=recs[1]["wall_s"] - audit_s)
    rio.write_shard(out, 1, pq.read_table(out / "results" / "shard-00001.parquet").to_pylist(), rec)
    js["runs"] = [{"wall_s": 2.0 + shard_wall / 2, "actor_startup_s": 2.0}]
    rio.write_job_json(out, js)
    fig = report.compute(report.load_job(out))
    st = status_mod.job_status(out)
    wall = 2.0 + shard_wall / 2
    audit_wall = (wall - 2.0) * audit_s / shard_wall
    tokens = sum(r["num_generated_tokens"] for r in recs.values())
    assert fig.wall_s == wall and not fig.wall_approx and fig.audit_wall_s == pytest.approx(audit_wall)
    assert fig.e2e_throughput == pytest.approx(tokens / (wall - audit_wall))
    assert st["tokens_per_s"] == fig.e2e_throughput and st["audit_wall_time_s"] == fig.audit_wall_s
    assert st["decode_tokens_per_s"] == fig.decode_throughput
    decode = [m for sid, _, _, info in job_run["pld"] if sid in (0, 1, 2) for m in [info.perf_metrics]]
    assert fig.decode_throughput == pytest.approx(sum(m.num_decode_tokens for m in decode)
                                                  / sum(m.decode_time for m in decode))
    # the pair's tokens/s divide by its busy seconds: shard 1's audit is not in them
    pair1 = fig.pairs.set_index("pair_id").loc[1]
    assert pair1.busy_s == pytest.approx(sum(r["wall_s"] for r in recs.values() if r["pair_id"] == 1) - audit_s)
    assert pair1.tokens_per_s == pytest.approx(pair1.tokens / pair1.busy_s)
    text = report.terminal_table(out)
    assert "audit's share of it" in text and "not in the throughputs" in text
    assert f"{st['tokens_per_s']:.1f} tok/s e2e" in status_mod.format_status(st)
