"""A session's decode step on one computing thread, and with a second thread of the same process
that has run torch and lives on (what a Ray actor had before its calls ran on one device thread:
cluster/actors.py, ``on_device``).

    python bench/bench_threads.py [--model qwen2.5-coder-0.5b] [--threads 2] [--repeats 6] [--steps 30]

libgomp gives each thread that enters a parallel region a team of its own; with more of those
threads than CPUs it stops spinning between regions, so every region wakes its workers. Printed:
the median ms of ``--steps`` one-token steps, per block, for each side, in blocks A B B A ... after
a warm-up; the second thread is started before the first "two teams" block and kept alive while
those blocks run, then let go, so "one team" blocks after it run with its team gone.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time

import numpy as np
import torch

import this_tree  # noqa: F401  (this tree's spd_cluster, not an installed one)
from spd_cluster.sessions import load_session
from spd_cluster.sessions.base import SessionCall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-coder-0.5b")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=6)
    ap.add_argument("--steps", type=int, default=30)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    session = load_session(args.model, role="target", device="cpu", dtype="bfloat16", full_batch_size=1,
                           ctx_len=1024, packed_linears=True)

    def call(i: int) -> dict:
        return SessionCall(np.array([[5]]), np.array([[200 + i % 50]]), np.array([0]),
                           num_logits_to_keep=np.zeros((1, 1), np.int64), argmax=True).as_inputs()

    def block() -> float:
        ts = []
        for i in range(args.steps):
            t = time.perf_counter()
            session.run(call(i))
            ts.append(time.perf_counter() - t)
        return statistics.median(ts)

    release = threading.Event()

    def other() -> None:  # a second thread that computes once and stays (a Ray thread of another group)
        torch.set_num_threads(args.threads)
        session.run(call(0))
        release.wait()

    for _ in range(3):
        block()  # warm-up
    times: dict[str, list[float]] = {"one team": [], "two teams": []}
    for r in range(args.repeats):
        for side in ("one team", "two teams") if r % 2 == 0 else ("two teams", "one team"):
            if side == "two teams":
                release.clear()
                th = threading.Thread(target=other)
                th.start()
                time.sleep(0.5)
            times[side].append(block())
            if side == "two teams":
                release.set()
                th.join()
    print(f"{args.model} bfloat16, {args.threads} threads, one-token steps at ~200 tokens of context, "
          f"{args.repeats} blocks of {args.steps} steps, ms: median [min-max] of the blocks' medians")
    for side, ts in times.items():
        ms = [t * 1e3 for t in ts]
        print(f"  {side:10} {statistics.median(ms):7.1f} [{min(ms):.1f}-{max(ms):.1f}]")
    ratios = [b / a for a, b in zip(times["one team"], times["two teams"])]
    print(f"  two teams / one team, per block pair: {statistics.median(ratios):.2f}x "
          f"[{min(ratios):.2f}-{max(ratios):.2f}]")


if __name__ == "__main__":
    main()
