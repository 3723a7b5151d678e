"""Resuming a finished job: the preflight reading job.json and the checkpoint (A: this tree) against
the full dataset scan it made before (B: cluster.preflight._complete disabled), interleaved
A B B A A B B A, each resume in a fresh process; medians and spread. The dataset and the first run
as bench/bench_orchestration.py makes them (16 Parquet files, stub engine, 4 pairs, local disk).

    .venv/bin/python bench/bench_resume.py 1000000
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "bench")]
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"


def child(spec: dict) -> dict:
    import logging

    from spd_cluster.cluster import coordinator, preflight
    from spd_cluster.config import JobConfig

    logging.getLogger("spd_cluster").setLevel(logging.ERROR)
    if spec["mode"] == "B":
        preflight._complete = lambda pf: None  # the scan it made before
    cfg = JobConfig.model_validate({
        "name": "orchestration", "mode": "pld", "target": {"model": spec["model"]},
        "dataset": {"path": spec["dataset"], "id_column": "id"}, "output": {"path": spec["output"]},
        "spd": {"max_new_tokens": 32, "full_batch_size": 4},
        "cluster": {"num_pairs": spec["pairs"], "cpus_per_actor": 1}, "audit": {"fraction": 0}})
    t0 = time.perf_counter()
    res = coordinator.run_job(cfg, progress=False)
    return {"s": time.perf_counter() - t0, "run": res.shards_run, "skipped": res.shards_skipped}


def main() -> None:
    if sys.argv[1] == "--child":
        print(json.dumps(child(json.loads(sys.argv[2]))))
        return
    n = int(sys.argv[1])
    from bench_cluster import tiny_model
    from bench_orchestration import write_dataset

    work = Path(tempfile.mkdtemp(prefix="bench_resume_"))
    write_dataset(str(work / "data"), n, 16)
    env = dict(os.environ, SPD_CLUSTER_ENGINE="stub_engine:build",
               PYTHONPATH=os.pathsep.join([str(REPO / "bench"), str(REPO), os.environ.get("PYTHONPATH", "")]))
    spec = {"model": tiny_model(work / "model"), "dataset": str(work / "data") + "/", "output": str(work / "out"),
            "pairs": 4}

    def run(mode: str) -> dict:
        p = subprocess.run([sys.executable, __file__, "--child", json.dumps({**spec, "mode": mode})], env=env,
                           capture_output=True, text=True)
        if p.returncode:
            raise SystemExit(p.stderr[-3000:])
        return json.loads(p.stdout.strip().splitlines()[-1])

    first = run("A")
    print(f"{n:,} prompts: first run {first['s']:.1f} s, {first['run']} shards", flush=True)
    got: dict[str, list[float]] = {"A": [], "B": []}
    for mode in "ABBAABBA":
        r = run(mode)
        assert r["run"] == 0 and r["skipped"] == first["run"], r
        got[mode].append(r["s"])
        print(f"{mode} {r['s']:.2f} s", flush=True)
    for mode, name in (("A", "job.json + checkpoint (this tree)"), ("B", "full dataset scan (before)")):
        s = got[mode]
        print(f"{mode} {name}: resume median {statistics.median(s):.2f} s (min {min(s):.2f}, max {max(s):.2f})")


if __name__ == "__main__":
    main()
