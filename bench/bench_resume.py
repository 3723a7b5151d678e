"""Resuming a job, finished and half-finished: this tree (A) against another tree (B, ``--base``:
e.g. the commit before, unpacked with `git archive`), interleaved A B B A ..., each resume in a fresh
process; medians and spread. The dataset and the first run as bench/bench_orchestration.py makes
them (16 Parquet files, stub engine, 4 pairs, local disk).

    finished  the same job again, `run_job` whole: it finds every shard written
    half      the shards from the middle on removed (their files and their rows of the checkpoint),
              then the resume up to its first shard in hand: preflight, plan and the first shard
              read from the dataset (what comes before Ray starts)

    git archive ba20384 spd_cluster | tar -x -C /tmp/base   # the tree before, for B
    .venv/bin/python bench/bench_resume.py 1000000 --base /tmp/base --repeats 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"


def config(spec: dict):
    from spd_cluster.config import JobConfig

    return JobConfig.model_validate({
        "name": "orchestration", "mode": "pld", "target": {"model": spec["model"]},
        "dataset": {"path": spec["dataset"], "id_column": "id"}, "output": {"path": spec["output"]},
        "spd": {"max_new_tokens": 32, "full_batch_size": 4},
        "cluster": {"num_pairs": spec["pairs"], "cpus_per_actor": 1}, "audit": {"fraction": 0}})


def child(spec: dict) -> dict:
    import logging

    from spd_cluster.cluster import coordinator
    from spd_cluster.cluster.plan import plan
    from spd_cluster.cluster.preflight import preflight

    logging.getLogger("spd_cluster").setLevel(logging.ERROR)
    cfg = config(spec)
    t0 = time.perf_counter()
    if spec["what"] == "half":
        p = plan(preflight(cfg, for_run=True))
        first = next(p.shards())
        out = {"run": p.todo, "skipped": p.skipped, "first": first.shard_id}
    else:
        res = coordinator.run_job(cfg, progress=False)
        out = {"run": res.shards_run, "skipped": res.shards_skipped}
    from bench_orchestration import peak_rss_mb

    return {**out, "s": time.perf_counter() - t0, "rss_mb": peak_rss_mb()}


def halve(output: str) -> int:
    """The job at ``output`` as if stopped half-way: the shards from the middle on gone (their
    files and their rows of shards.parquet). Returns the shards kept."""
    from spd_cluster.io import fs
    from spd_cluster.io import results as rio

    out = fs.resolve(output)
    n = json.loads(fs.read_bytes(rio.job_json_path(out)))["num_shards"]
    for sid, loc in rio.written_shards(out).items():
        if sid >= n // 2:
            fs.delete(loc)
    rio.write_shards_table(out, [r for r in rio.read_shards_table(out) if r["shard_id"] < n // 2])
    return n // 2


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        spec = json.loads(sys.argv[2])
        sys.path[:0] = [spec["tree"], str(REPO / "bench")]
        print(json.dumps(child(spec)))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("prompts", type=int)
    ap.add_argument("--base", help="B: a tree whose spd_cluster/ is the code before (default: no B)")
    ap.add_argument("--repeats", type=int, default=2, help="blocks of A B B A per state")
    ap.add_argument("--states", nargs="+", default=["finished", "half"], choices=["finished", "half"])
    args = ap.parse_args()
    sys.path[:0] = [str(REPO), str(REPO / "bench")]
    from bench_cluster import tiny_model
    from bench_orchestration import write_dataset

    work = Path(tempfile.mkdtemp(prefix="bench_resume_"))
    write_dataset(str(work / "data"), args.prompts, 16)
    env = dict(os.environ, SPD_CLUSTER_ENGINE="stub_engine:build",
               PYTHONPATH=os.pathsep.join([str(REPO / "bench"), os.environ.get("PYTHONPATH", "")]))
    spec = {"model": tiny_model(work / "model"), "dataset": str(work / "data") + "/", "output": str(work / "out"),
            "pairs": 4}
    trees = {"A": str(REPO), "B": str(Path(args.base).resolve()) if args.base else None}

    def run(mode: str, what: str) -> dict:
        p = subprocess.run([sys.executable, __file__, "--child", json.dumps({**spec, "tree": trees[mode], "what": what})],
                           env=env, capture_output=True, text=True)
        if p.returncode:
            raise SystemExit(p.stderr[-3000:])
        return json.loads(p.stdout.strip().splitlines()[-1])

    first = run("A", "finished")
    print(f"{args.prompts:,} prompts: first run {first['s']:.1f} s, {first['run']} shards, driver {first['rss_mb']:.0f} MB",
          flush=True)
    order = "ABBA" * args.repeats if args.base else "A" * (2 * args.repeats)
    for what in args.states:
        kept = halve(spec["output"]) if what == "half" else first["run"]
        got: dict[str, list[float]] = {"A": [], "B": []}
        run("A", what if what == "finished" else "half")  # warm-up (the page cache), discarded
        for mode in order:
            r = run(mode, what)
            assert r["skipped"] == kept and (r["run"] == 0 if what == "finished" else r["first"] == kept), r
            got[mode].append(r["s"])
            print(f"{what} {mode} {r['s']:.2f} s, driver {r['rss_mb']:.0f} MB", flush=True)
        for mode, name in (("A", "this tree"), ("B", f"{args.base}")):
            s = got[mode]
            if s:
                print(f"{what} {mode} ({name}): median {statistics.median(s):.2f} s [{min(s):.2f}-{max(s):.2f}] "
                      f"over {len(s)}", flush=True)


if __name__ == "__main__":
    main()
