"""The orchestration alone, at scale (issue 18): a job whose engine costs nothing (stub_engine.py),
over 16 Parquet files, on the local disk and on a local S3 API. Prints figures; not a test.

Each configuration runs in a fresh process (so its peak RSS is its own): the job, then the same
job again (a resume of a finished job: what it reads to find there is nothing to do).

    .venv/bin/python bench/bench_orchestration.py                          # 100k and 1M, 1 and 4 pairs, local and s3
    .venv/bin/python bench/bench_orchestration.py --prompts 100000 --pairs 1 --fs local

Columns: run_s = the whole `run_job` call (scan, Ray start, the job, the summary files); wall_s =
the job wall time it reports (run start to last shard); start_s = the part of it before the first
dispatch (Ray, placement, actors); prompts/s = prompts / wall_s; steady/s = prompts / (wall_s -
start_s); rss_mb = the driver's peak RSS over the job (VmHWM: ru_maxrss would carry this
process's peak, writing the dataset, over the child's exec); resume_s = the second `run_job` call, which
finds every shard written; half_s = the job made half-finished (bench_resume.halve: the shards
from the middle on gone), its resume up to the first shard in hand (preflight, plan, that shard read).
Targets: >= 5,000 prompts/s at the default shard size; RSS at 10M within 1.1x of 1M (issue 27);
resume of a finished 10M job < 15 s.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))


def write_dataset(where: str, prompts: int, files: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from spd_cluster.io import fs

    root = fs.resolve(where)
    per = -(-prompts // files)
    for i in range(files):
        lo, hi = i * per, min(prompts, (i + 1) * per)
        t = pa.table({"id": [f"q{j}" for j in range(lo, hi)],
                      "prompt": [f"Question {j}: what is {j} plus {j % 97}? Answer briefly." for j in range(lo, hi)]})
        sink = pa.BufferOutputStream()
        pq.write_table(t, sink)
        fs.write_bytes(root.join(f"part-{i:02d}.parquet"), sink.getvalue().to_pybytes())


def peak_rss_mb() -> float:
    """This process's peak RSS: VmHWM, its own memory's high-water mark. Not getrusage's
    ru_maxrss, which on Linux carries the parent's peak over the exec (the parent wrote the
    dataset: at 10M prompts that was the figure)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(spec: dict) -> dict:
    import logging

    from spd_cluster.cluster.coordinator import run_job
    from spd_cluster.config import JobConfig
    from spd_cluster.io.results import read_job_json

    logging.getLogger("spd_cluster").setLevel(logging.ERROR)
    cfg = JobConfig.model_validate({
        "name": "orchestration", "mode": "pld", "target": {"model": spec["model"]},
        "dataset": {"path": spec["dataset"], "id_column": "id"}, "output": {"path": spec["output"]},
        "spd": {"max_new_tokens": spec["max_new_tokens"], "full_batch_size": 4},
        "cluster": {"num_pairs": spec["pairs"], "shard_size": spec["shard_size"], "cpus_per_actor": 1},
        "audit": {"fraction": 0},
    })
    t0 = time.perf_counter()
    res = run_job(cfg, progress=False)
    run_s = time.perf_counter() - t0
    assert res.num_prompts == spec["prompts"] and res.num_errors == 0, res
    rss_mb = peak_rss_mb()
    t0 = time.perf_counter()
    again = run_job(cfg, progress=False)
    resume_s = time.perf_counter() - t0
    assert again.shards_run == 0 and again.shards_skipped == res.shards_run
    job = read_job_json(spec["output"])
    startup = float(job["runs"][0]["actor_startup_s"])
    # half-finished: the shards from the middle on gone; the resume up to its first shard in hand
    from bench_resume import halve

    from spd_cluster.cluster.plan import plan
    from spd_cluster.cluster.preflight import preflight

    kept = halve(spec["output"])
    t0 = time.perf_counter()
    p = plan(preflight(cfg, for_run=True))
    first = next(p.shards())
    half_s = time.perf_counter() - t0
    assert p.skipped == kept and first.shard_id == kept
    return {"run_s": run_s, "wall_s": res.wall_time_s, "prompts_per_s": res.num_prompts / res.wall_time_s,
            "startup_s": startup, "steady_per_s": res.num_prompts / (res.wall_time_s - startup),
            "rss_mb": rss_mb, "resume_s": resume_s, "half_s": half_s,
            "rss_end_mb": peak_rss_mb(),
            "shards": res.shards_run, "shard_size": job["shard_size"]}


def moto(port: int):
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    return server


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--pairs", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--fs", nargs="+", default=["local", "s3"], choices=["local", "s3"])
    ap.add_argument("--files", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--shard-size", type=int, default=None, help="default: the job's own default (null)")
    ap.add_argument("--tree", help="run the jobs with this tree's spd_cluster/ (e.g. the commit before, "
                                   "unpacked with `git archive`); default: this one")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        spec = json.loads(args.child)
        if spec.get("tree"):
            sys.path.insert(0, spec["tree"])
            for name in [m for m in sys.modules if m == "spd_cluster" or m.startswith("spd_cluster.")]:
                del sys.modules[name]
        print(json.dumps(child(spec)))
        return

    from bench_cluster import tiny_model

    work = Path(tempfile.mkdtemp(prefix="bench_orch_"))
    model = tiny_model(work / "model")
    env = dict(os.environ, SPD_CLUSTER_ENGINE="stub_engine:build",
               PYTHONPATH=os.pathsep.join([str(REPO / "bench"), str(Path(args.tree).resolve() if args.tree else REPO),
                                           os.environ.get("PYTHONPATH", "")]))
    server = None
    if "s3" in args.fs:
        import pyarrow.fs as pafs

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        server = moto(port)
        env.update(AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
                   AWS_DEFAULT_REGION="us-east-1", AWS_EC2_METADATA_DISABLED="true")
        os.environ.update({k: env[k] for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                               "AWS_DEFAULT_REGION", "AWS_EC2_METADATA_DISABLED")})
        pafs.S3FileSystem(endpoint_override=env["AWS_ENDPOINT_URL"], allow_bucket_creation=True).create_dir("bench")
    print(f"{'fs':<6} {'prompts':>9} {'pairs':>5} {'shard':>6} {'shards':>6} {'run_s':>7} {'wall_s':>7} "
          f"{'start_s':>7} {'prompts/s':>10} {'steady/s':>9} {'rss_mb':>7} {'resume_s':>8} {'half_s':>7}", flush=True)
    for where in args.fs:
        for n in args.prompts:
            base = str(work / where) if where == "local" else f"s3://bench/{n}"
            dataset = f"{base}/data-{n}"
            write_dataset(dataset, n, args.files)
            for pairs in args.pairs:
                spec = {"model": model, "dataset": dataset + "/", "output": f"{base}/out-{n}-{pairs}", "prompts": n,
                        "pairs": pairs, "shard_size": args.shard_size, "max_new_tokens": args.max_new_tokens,
                        "tree": str(Path(args.tree).resolve()) if args.tree else None}
                p = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], env=env,
                                   capture_output=True, text=True)
                if p.returncode:
                    print(p.stdout[-2000:], p.stderr[-4000:], file=sys.stderr)
                    raise SystemExit(f"{where} {n} prompts {pairs} pairs failed")
                r = json.loads(p.stdout.strip().splitlines()[-1])
                print(f"{where:<6} {n:>9,} {pairs:>5} {r['shard_size']:>6} {r['shards']:>6} {r['run_s']:>7.1f} "
                      f"{r['wall_s']:>7.1f} {r['startup_s']:>7.1f} {r['prompts_per_s']:>10,.0f} "
                      f"{r['steady_per_s']:>9,.0f} {r['rss_mb']:>7.0f} {r['resume_s']:>8.1f} {r['half_s']:>7.1f}",
                      flush=True)
    if server is not None:
        server.stop()


if __name__ == "__main__":
    main()
