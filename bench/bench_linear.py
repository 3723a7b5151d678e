"""Few-row linears and session steps: PyTorch's CPU kernels vs ours, same weights, same run.

    python bench/bench_linear.py [--model qwen2.5-coder-1.5b] [--rows 1,5,8] [--threads 2]

Part 1, the linear alone (Qwen2.5-Coder-1.5B's MLP and lm_head shapes, random weights):
bfloat16 ``F.linear`` vs our AVX2 kernel (sessions/bf16.py), ms per call by row count. Part 2,
whole session steps on the real model in bfloat16 at 100 tokens of context: a 1-token decode and
a 5-token verify, on a session with PyTorch's kernels (``pack=False``) and on one with ours
(``pack=True``: the bf16 kernel plus row-wise attention). Calls alternate between the two.
"""

from __future__ import annotations

import argparse
import copy
import statistics
from time import perf_counter

import numpy as np
import torch
import torch.nn.functional as F

from spd_cluster.sessions import bf16, load_model
from spd_cluster.sessions.torch_session import TorchSession


def ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = perf_counter()
        fn()
        times.append(perf_counter() - t)
    return statistics.median(times) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="qwen2.5-coder-1.5b")
    ap.add_argument("--rows", default="1,5,8")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=9)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = [int(r) for r in args.rows.split(",")]
    print(f"{args.threads} threads, CPU capability {torch.backends.cpu.get_cpu_capability()}, median of {args.repeats}")
    print(f"{'linear [N x K]':22} {'rows':>4} {'torch bf16 ms':>14} {'ours ms':>8} {'ratio':>6}")
    for n, k in ((8960, 1536), (1536, 8960), (151936, 1536)):
        w = torch.randn(n, k).to(torch.bfloat16)
        for m in rows:
            x = torch.randn(m, k).to(torch.bfloat16)
            a, b = ms(lambda: F.linear(x, w), args.repeats), ms(lambda: bf16.linear(x, w), args.repeats)
            print(f"{f'{n} x {k}':22} {m:>4} {a:14.2f} {b:8.2f} {a / b:6.2f}")

    model = load_model(args.model, "bfloat16")
    sessions = {"torch": TorchSession(copy.deepcopy(model), 1, 512), "ours": TorchSession(model, 1, 512, pack=True)}
    rng = np.random.default_rng(0)

    def step(s, width, start):
        s.run({"input_ids": rng.integers(100, 5000, size=(1, width)), "position_ids": (start + np.arange(width))[None],
               "batch_index": np.zeros((1, 1), np.int64), "num_logits_to_keep": np.zeros((width, 1), np.int64)})

    for s in sessions.values():
        step(s, 100, 0)
    times = {(name, w): [] for name in sessions for w in (1, 5)}
    for _ in range(args.repeats):
        for name, s in sessions.items():
            for w in (1, 5):
                t = perf_counter()
                step(s, w, 100)
                times[name, w].append(perf_counter() - t)
    print(f"\n{args.model} bfloat16 session step at 100 tokens of context (ms, median)")
    print(f"{'kernels':8} {'decode (1)':>10} {'verify (5)':>10} {'verify/decode':>14}")
    for name in sessions:
        d, v = (statistics.median(times[name, w]) * 1e3 for w in (1, 5))
        print(f"{name:8} {d:10.1f} {v:10.1f} {v / d:14.2f}   ({sessions[name].packed})")


if __name__ == "__main__":
    main()
