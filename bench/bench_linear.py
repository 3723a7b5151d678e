"""Few-row linears and session steps: PyTorch's CPU kernels vs ours (AVX2 and AVX512-BF16 tiles),
same weights, same run.

    python bench/bench_linear.py [--model qwen2.5-coder-1.5b] [--rows 1,2,3,4,5,6,7,8] [--widths 1,...,8]
                                 [--context 100,600] [--threads 2] [--repeats 9] [--clock wall|cpu] [--no-session]
                                 [--attention]

Part 1, the linear alone (Qwen2.5-Coder-1.5B's attention, MLP and lm_head shapes, random bfloat16
weights and activations): ms per call by row count for PyTorch's bfloat16 ``F.linear`` and our
kernel on each set of tiles this CPU runs (sessions/bf16.py). Each timed sample calls every copy
of a pool of weights (at least 256 MB) once, so weights come from memory as in a model's forward,
not from the cache. Part 2, whole session steps on the real model in bfloat16 at 100 tokens of
context (``--context``: at each of these; attention grows with it): a verify of each width (1 = a decode step), on a session with PyTorch's kernels
(``pack=False``) and on one with ours (``pack=True``: the kernel plus row-wise attention) on each
set of tiles; the tiles are switched per call (``bf16.set_isa``), on the same session.

``--attention`` adds the row-wise attention kernel alone (kernels/attention.h) at the model's
attention shape (Qwen2.5-Coder-1.5B: 12 query heads over 2 key/value heads of 128): microseconds a layer by
query rows (a verify's width at one sequence) and ``--context``.

Every sample of every side is taken in interleaved blocks (A B C | C B A | ...) after a warm-up;
printed: the median, and the spread as min-max over the repeats. ``--clock cpu`` times with the
process's CPU time instead of the wall clock: on a machine shared with other work, with
``--threads 1`` (and so no thread waiting for another), it counts what the step itself costs a
core, not the time other processes held it.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F

import this_tree  # noqa: F401  (this tree's spd_cluster, not an installed one)
from spd_cluster.sessions import bf16, load_model
from spd_cluster.sessions.torch_session import TorchSession

QWEN_15B = {"q/o_proj": (1536, 1536), "k/v_proj": (256, 1536), "gate/up_proj": (8960, 1536),
            "down_proj": (1536, 8960), "lm_head": (151936, 1536)}
POOL_BYTES = 256 << 20
clock = time.perf_counter


def interleaved(sides: dict, repeats: int) -> dict:
    """sides: name -> fn() returning seconds. A warm-up call of each, then ``repeats`` blocks of one
    call of each side, forward and reverse order in turn. Returns name -> list of seconds."""
    names = list(sides)
    for n in names:
        sides[n]()
    times = {n: [] for n in names}
    for r in range(repeats):
        for n in names if r % 2 == 0 else names[::-1]:
            times[n].append(sides[n]())
    return times


def fmt(ts: list, scale: float = 1e3) -> str:
    return f"{statistics.median(ts) * scale:8.2f} ({min(ts) * scale:.2f}-{max(ts) * scale:.2f})"


def linear_sides(isas: list, x, pool) -> dict:
    def ours(isa):
        def go():
            bf16.set_isa(isa)
            t = clock()
            for w in pool:
                bf16.linear(x, w)
            return (clock() - t) / len(pool)
        return go

    def torch_linear():
        t = clock()
        for w in pool:
            F.linear(x, w)
        return (clock() - t) / len(pool)

    return {"torch": torch_linear, **{isa: ours(isa) for isa in isas}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="qwen2.5-coder-1.5b")
    ap.add_argument("--rows", default="1,2,3,4,5,6,7,8")
    ap.add_argument("--widths", default="1,2,3,4,5,6,7,8")
    ap.add_argument("--shapes", default=",".join(QWEN_15B), help=f"of {', '.join(QWEN_15B)}")
    ap.add_argument("--context", default="100", help="part 2: tokens of context before the step (comma list)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    ap.add_argument("--no-linear", action="store_true")
    ap.add_argument("--no-session", action="store_true")
    ap.add_argument("--attention", action="store_true", help="also time the row-wise attention kernel alone")
    ap.add_argument("--no-torch-session", action="store_true", help="leave out the session on PyTorch's kernels")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    global clock
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    isas = bf16.isas()
    default = bf16.isa()
    load = os.getloadavg()[0]
    print(f"{args.threads} threads, CPU capability {torch.backends.cpu.get_cpu_capability()}, our tiles {isas} "
          f"(default {default}), {args.repeats} interleaved repeats after a warm-up, {args.clock} clock, load average {load:.1f}")
    print("ms: median (min-max)")
    if not args.no_linear:
        print(f"\n{'linear [N x K]':26} {'rows':>4} " + " ".join(f"{s:>24}" for s in ["torch bf16", *isas]))
        for name in args.shapes.split(","):
            n, k = QWEN_15B[name]
            g = torch.Generator().manual_seed(n + k)
            pool = [torch.randn(n, k, generator=g).to(torch.bfloat16)
                    for _ in range(max(1, POOL_BYTES // (2 * n * k)))]
            base = None
            for m in (int(r) for r in args.rows.split(",")):
                x = torch.randn(m, k, generator=g).to(torch.bfloat16)
                times = interleaved(linear_sides(isas, x, pool), args.repeats)
                cells = [fmt(times[s]) for s in times]
                print(f"{f'{name} {n} x {k}':26} {m:>4} " + " ".join(f"{c:>24}" for c in cells), flush=True)
            del pool
    bf16.set_isa(default)
    if args.attention:
        attention_table([int(r) for r in args.widths.split(",")], [int(c) for c in args.context.split(",")],
                        args.repeats)
    if args.no_session:
        return

    model = load_model(args.model, "bfloat16")
    contexts = [int(c) for c in args.context.split(",")]
    ctx_len = max(512, max(contexts) + 16)
    ours = TorchSession(model if args.no_torch_session else copy.deepcopy(model), 1, ctx_len, pack=True)
    sessions = {"ours": ours} if args.no_torch_session else {"torch": TorchSession(model, 1, ctx_len), "ours": ours}
    rng = np.random.default_rng(0)

    def step(s, width, start):
        s.run({"input_ids": rng.integers(100, 5000, size=(1, width)), "position_ids": (start + np.arange(width))[None],
               "batch_index": np.zeros((1, 1), np.int64), "num_logits_to_keep": np.zeros((width, 1), np.int64)})

    for s in sessions.values():
        for start in range(0, max(contexts), 100):
            step(s, min(100, max(contexts) - start), start)
    sides = {}
    widths = [int(w) for w in args.widths.split(",")]
    for c in contexts:
        for w in widths:
            if "torch" in sessions:
                sides["torch", c, w] = lambda w=w, c=c: timed(lambda: step(sessions["torch"], w, c))
            for isa in isas:
                sides[isa, c, w] = lambda w=w, c=c, isa=isa: (bf16.set_isa(isa), timed(lambda: step(ours, w, c)))[1]
    times = interleaved(sides, args.repeats)
    bf16.set_isa(default)
    names = (["torch"] if "torch" in sessions else []) + isas
    for c in contexts:
        print(f"\n{args.model} bfloat16 session step at {c} tokens of context, ms: median (min-max), and the median "
              f"over width 1's")
        print(f"{'width':>5} " + " ".join(f"{n:>32}" for n in names))
        for w in widths:
            cells = [f"{fmt(times[n, c, w])} "
                     f"{statistics.median(times[n, c, w]) / statistics.median(times[n, c, widths[0]]):5.2f}x"
                     for n in names]
            print(f"{w:>5} " + " ".join(f"{c:>32}" for c in cells), flush=True)
    print(f"load average at the end {os.getloadavg()[0]:.1f}")


def attention_table(rows: list, contexts: list, repeats: int, heads: int = 12, kv_heads: int = 2,
                    dim: int = 128) -> None:
    ext = bf16.extension()
    if ext is None:
        print("\nrow-wise attention: the extension is not built here")
        return
    g = torch.Generator().manual_seed(0)
    sides = {}
    for c in contexts:
        k, v = (torch.randn(1, kv_heads, c, dim, generator=g) for _ in range(2))
        for r in rows:
            q = torch.randn(1, heads, r, dim, generator=g)
            lengths = torch.tensor([[c - r + 1 + i for i in range(r)]])

            def side(q=q, k=k, v=v, lengths=lengths, calls=50):
                t = clock()
                for _ in range(calls):
                    ext.rowwise_attention(q, k, v, lengths, dim ** -0.5)
                return (clock() - t) / calls
            sides[c, r] = side
    times = interleaved(sides, repeats)
    print(f"\nrow-wise attention alone ({heads} query heads over {kv_heads} key/value heads of {dim}), us a layer: "
          f"median (min-max), and the median over one row's")
    print(f"{'context':>7} " + " ".join(f"{f'{r} rows':>28}" for r in rows))
    for c in contexts:
        cells = [f"{fmt(times[c, r], 1e6)} {statistics.median(times[c, r]) / statistics.median(times[c, rows[0]]):5.2f}x"
                 for r in rows]
        print(f"{c:>7} " + " ".join(f"{x:>28}" for x in cells), flush=True)


def timed(fn) -> float:
    t = clock()
    fn()
    return clock() - t


if __name__ == "__main__":
    main()
