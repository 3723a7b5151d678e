"""A draft pair's speculative step in two processes that take turns on the same cores (what a
draft job's target and draft actors do), against the same step in one process.

    python bench/bench_handover.py [--k 4] [--repeats 4] [--steps 20] [--spin 0,10000]

A step is the target's verify of k + 1 tokens (1.5B) then k one-token draft forwards (0.5B), as
in a draft pair at one row a step. "one process": both sessions on one thread. "pair": the
target's process calls the draft's over a pipe and waits, as the target actor waits on
``draft_step``; each process has every thread (cluster/actors.py, ``actor_threads``). "pair, spin
N": the same with ``GOMP_SPINCOUNT=N`` in both processes' environment. Sides run in blocks
A B C C B A ... on processes loaded once; printed, per side: the median ms of a step, of the
verify and of each draft forward by its place in the step, median [min-max] over blocks.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import time

import numpy as np

TARGET, DRAFT = "qwen2.5-coder-1.5b", "qwen2.5-coder-0.5b"


def _session(model: str, threads: int):
    import torch

    import this_tree  # noqa: F401
    from spd_cluster.sessions import load_session

    torch.set_num_threads(threads)
    return load_session(model, role="target", device="cpu", dtype="bfloat16", full_batch_size=1,
                        ctx_len=1024, packed_linears=True)


def _run(session, width: int, pos: int) -> float:
    from spd_cluster.sessions.base import SessionCall

    ids = np.full((1, width), 200 + pos % 50, dtype=np.int64)
    call = SessionCall(ids, (pos + np.arange(width, dtype=np.int64))[None], np.array([0]),
                       num_logits_to_keep=np.zeros((width, 1), np.int64), argmax=True)
    t = time.perf_counter()
    session.run(call.as_inputs())
    return time.perf_counter() - t


def _draft_proc(conn, threads: int) -> None:
    session = _session(DRAFT, threads)
    conn.send("ready")
    while True:
        msg = conn.recv()
        if msg is None:
            return
        k, pos = msg
        conn.send([_run(session, 1, pos + i) for i in range(k)])


def _target_proc(conn, threads: int, draft_conn=None) -> None:
    """Steps of verify + k drafts: the drafts in this process (``draft_conn`` None) or the draft's."""
    target = _session(TARGET, threads)
    draft = _session(DRAFT, threads) if draft_conn is None else None
    if draft_conn is not None:
        assert draft_conn.recv() == "ready"
    conn.send("ready")
    while True:
        msg = conn.recv()
        if msg is None:
            if draft_conn is not None:
                draft_conn.send(None)
            return
        steps, k = msg
        rows = []
        for s in range(steps):
            pos = 300 + (s * (k + 1)) % 400
            t0 = time.perf_counter()
            verify = _run(target, k + 1, pos)
            if draft is None:
                draft_conn.send((k, pos + k + 1))
                drafts = draft_conn.recv()
            else:
                drafts = [_run(draft, 1, pos + k + 1 + i) for i in range(k)]
            rows.append((time.perf_counter() - t0, verify, drafts))
        conn.send(rows)


def _start(ctx, side: str, threads: int, spin: int | None):
    env_before = os.environ.get("GOMP_SPINCOUNT")
    if spin is not None:
        os.environ["GOMP_SPINCOUNT"] = str(spin)
    try:
        conn, child = ctx.Pipe()
        procs = []
        if side == "one process":
            procs.append(ctx.Process(target=_target_proc, args=(child, threads)))
        else:
            d_parent, d_child = ctx.Pipe()
            procs.append(ctx.Process(target=_draft_proc, args=(d_child, threads)))
            procs.append(ctx.Process(target=_target_proc, args=(child, threads, d_parent)))
        for p in procs:
            p.start()
    finally:
        if env_before is None:
            os.environ.pop("GOMP_SPINCOUNT", None)
        else:
            os.environ["GOMP_SPINCOUNT"] = env_before
    assert conn.recv() == "ready"
    return conn, procs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=4)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--spin", default="", help="GOMP_SPINCOUNT values for extra pair sides, comma-separated")
    args = ap.parse_args()
    ctx = mp.get_context("spawn")
    sides = {"one process": None, "pair": None}
    for n in [int(x) for x in args.spin.split(",") if x]:
        sides[f"pair, spin {n}"] = n
    procs = {side: _start(ctx, side if side == "one process" else "pair", args.threads, spin)
             for side, spin in sides.items()}
    order = list(sides)
    for conn, _ in procs.values():  # warm-up: two blocks a side
        for _ in range(2):
            conn.send((args.steps, args.k))
            conn.recv()
    res: dict[str, list] = {s: [] for s in order}
    for r in range(args.repeats):
        for side in (order if r % 2 == 0 else order[::-1]):
            conn = procs[side][0]
            conn.send((args.steps, args.k))
            res[side].append(conn.recv())
    for conn, ps in procs.values():
        conn.send(None)
        for p in ps:
            p.join()

    def spread(xs):
        ms = [x * 1e3 for x in xs]
        return f"{statistics.median(ms):6.1f} [{min(ms):.1f}-{max(ms):.1f}]"

    print(f"{TARGET} verify of {args.k + 1} + {args.k} {DRAFT} forwards, bf16, {args.threads} threads a "
          f"process, {args.repeats} blocks of {args.steps} steps; ms, median [min-max] over blocks")
    for side in order:
        blocks = res[side]
        step = [statistics.median(r[0] for r in b) for b in blocks]
        verify = [statistics.median(r[1] for r in b) for b in blocks]
        by_place = [spread([statistics.median(r[2][i] for r in b) for b in blocks]) for i in range(args.k)]
        print(f"  {side:16} step {spread(step)}  verify {spread(verify)}  drafts by place: "
              + " | ".join(by_place))
    base = res[order[0]]
    for side in order[1:]:
        ratios = [statistics.median(r[0] for r in b) / statistics.median(r[0] for r in a)
                  for a, b in zip(base, res[side])]
        print(f"  {side} / one process, per block: {statistics.median(ratios):.2f}x "
              f"[{min(ratios):.2f}-{max(ratios):.2f}]")


if __name__ == "__main__":
    main()
