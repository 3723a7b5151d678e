"""A draft's one-token step with its whole readout and with ``spd.draft_vocab`` (sessions/readout.py).

    python bench/bench_readout.py [--model qwen2.5-coder-0.5b] [--vocab 32768] [--repeats 6] [--steps 30]

Two sessions of the same model in one process, one of them reading out only the first
``--vocab`` ids and the ids it was fed; one-token greedy steps at ~300 tokens of context, in
blocks A B B A ... after a warm-up. Printed: the median ms of a block's steps, median [min-max]
over blocks, and the per-block ratio.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

import this_tree  # noqa: F401  (this tree's spd_cluster, not an installed one)
from spd_cluster.sessions import load_session
from spd_cluster.sessions.base import SessionCall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-coder-0.5b")
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=6)
    ap.add_argument("--steps", type=int, default=30)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    sides = {name: load_session(args.model, role="draft", device="cpu", dtype="bfloat16", full_batch_size=1,
                                ctx_len=1024, packed_linears=True, draft_vocab=vocab)
             for name, vocab in (("whole vocabulary", None), (f"first {args.vocab} ids", args.vocab))}
    prompt = np.random.default_rng(0).integers(0, 151_000, size=(1, 300))
    for s in sides.values():  # the prompt: its ids above --vocab join that session's readout
        s.run(SessionCall(prompt, np.arange(300)[None], np.array([0]), argmax=True).as_inputs())

    def block(session) -> float:
        ts = []
        for i in range(args.steps):
            call = SessionCall(np.array([[200 + i % 50]]), np.array([[300 + i]]), np.array([0]), argmax=True)
            t = time.perf_counter()
            session.run(call.as_inputs())
            ts.append(time.perf_counter() - t)
        return statistics.median(ts)

    names = list(sides)
    for name in names:
        block(sides[name])
        block(sides[name])
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(args.repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            times[name].append(block(sides[name]) * 1e3)
    print(f"{args.model} bfloat16, {args.threads} threads, one-token steps at ~300 tokens of context, "
          f"{args.repeats} blocks of {args.steps} steps; ms, median [min-max] of the blocks' medians")
    for name, ms in times.items():
        print(f"  {name:20} {statistics.median(ms):6.1f} [{min(ms):.1f}-{max(ms):.1f}]")
    ratios = [b / a for a, b in zip(*times.values())]
    print(f"  {names[1]} / {names[0]}, per block: {statistics.median(ratios):.2f}x [{min(ratios):.2f}-{max(ratios):.2f}]")


if __name__ == "__main__":
    main()
