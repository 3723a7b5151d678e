"""The overlapped draft against the sequential pair, on modelled devices.

    python bench/bench_overlap.py [--target-ms 20] [--draft-ratio 0.15] [--k 4] [--miss 0 0.05 0.1 0.2 0.3]

Two ``TimedSession``s (sessions/timed.py): each target call takes ``--target-ms``, each draft call
``--draft-ratio`` of that, sleeping, so the two devices run at once whatever the host's cores.
Under them, scripted sessions honour the contract and decide acceptance: the target's next token
at position p is a fixed table's, the draft's is the same except at a share ``--miss`` of the
positions (drawn once), where it is wrong. Greedy, k fixed (adaptive k off), 4 prompts in one
slot after another. Prints per miss rate: the sequential pair's tokens/s and accepted tokens per
step, the overlapped pair's, the speedup, how many rows' guesses were used or thrown away, and
whether the outputs are token-identical.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import this_tree  # noqa: E402, F401  (this tree's spd_cluster, not an installed one)

from interleave import Sample, run_interleaved, summarize  # noqa: E402

from spd_cluster.engine import SpDEngine, SpDSettings  # noqa: E402
from spd_cluster.sessions.base import check_inputs, keep_index  # noqa: E402
from spd_cluster.sessions.timed import TimedSession  # noqa: E402

VOCAB = 1000


class ScriptedSession:
    """The next token after position p is ``table[p + 1]``, whatever came before: acceptance is
    set by the tables alone. KV needs no keeping: nothing depends on it."""

    def __init__(self, table: np.ndarray, fbs: int, ctx_len: int):
        self.table, self.full_batch_size, self.ctx_len = table, fbs, ctx_len
        self.vocab_size, self.num_heads, self.eos_token_ids = VOCAB, 0, []

    def run(self, inputs):
        x = check_inputs(inputs, self.full_batch_size, self.ctx_len)
        if not x.argmax:
            raise ValueError("scripted sessions answer argmax calls only (greedy)")
        pos = x.position_ids[np.arange(x.position_ids.shape[0])[:, None], keep_index(x.position_ids, x.num_logits)]
        return {"tokens": self.table[np.clip(pos, 0, self.ctx_len - 2) + 1]}


def pair(miss: float, args, seed: int = 0):
    rng = np.random.default_rng(seed)
    ctx = 512
    target = rng.integers(1, VOCAB, ctx)
    draft = np.where(rng.random(ctx) < miss, (target + 1) % VOCAB, target)
    t = args.target_ms / 1000
    return (TimedSession(ScriptedSession(target, 1, ctx), t),
            TimedSession(ScriptedSession(draft, 1, ctx), t * args.draft_ratio))


def run(miss: float, overlap: bool, args):
    target, draft = pair(miss, args)
    s = SpDSettings(num_speculative_tokens=args.k, prefill_seq_len=16, ctx_len=512, max_new_tokens=args.new,
                    full_batch_size=1, ignore_eos=True, adaptive_k=False, overlap_draft=overlap)
    engine = SpDEngine("draft", target, None, s, draft=draft, eos_token_ids=[])
    prompts = [list(range(1, 9 + i)) for i in range(4)]
    t0 = time.perf_counter()
    info = engine.generate(prompts)
    wall = time.perf_counter() - t0
    m = info.perf_metrics
    return m.num_decode_tokens / m.decode_time, m.mean_num_accepted_tokens, [g.tolist() for g in info.generated_ids], \
        engine.proposer, wall, target.calls, draft.calls


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target-ms", type=float, default=20.0)
    ap.add_argument("--draft-ratio", type=float, default=0.15)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--new", type=int, default=96)
    ap.add_argument("--miss", type=float, nargs="+", default=[0.0, 0.05, 0.1, 0.2, 0.3])
    ap.add_argument("--repeats", type=int, default=2, help="interleaved blocks per miss rate")
    args = ap.parse_args()
    print(f"target step {args.target_ms:.0f} ms, draft step {args.draft_ratio:.2f}x, k={args.k}, {args.new} new tokens "
          f"x 4 prompts, greedy, one slot")
    print("per miss rate: sequential and overlapped interleaved (bench/interleave.py: a warm-up of each, then "
          f"{args.repeats} blocks S O | O S ...); speedup = median of the per-block ratios [min-max]")
    print(f"{'miss':>5} {'seq tok/s':>9} {'acc/step':>8} {'overlap tok/s':>13} {'acc/step':>8} {'speedup':>18} "
          f"{'hits':>5} {'misses':>6} {'draft calls':>11} identical")
    for miss in args.miss:
        last = {}

        def one(name: str) -> Sample:
            tps, acc, ids, prop, _, _, calls = run(miss, name == "overlapped", args)
            last[name] = (ids, prop, calls)
            return Sample(tps, acc)

        runs = run_interleaved(["sequential", "overlapped"], one, args.repeats, log=lambda line: None)
        seq, ovl = summarize(runs, "sequential", is_bounded=lambda name: False)
        (seq_ids, _, seq_draft), (ovl_ids, prop, ovl_draft) = last["sequential"], last["overlapped"]
        sp = ovl.speedup
        print(f"{miss:5.2f} {seq.throughput[0]:9.1f} {seq.tokens_per_step[0]:8.2f} {ovl.throughput[0]:13.1f} "
              f"{ovl.tokens_per_step[0]:8.2f} {sp[0]:6.2f}x [{sp[1]:.2f}-{sp[2]:.2f}] {prop.hits:5d} "
              f"{prop.misses:6d} {seq_draft:5d}/{ovl_draft:<5d} {seq_ids == ovl_ids}", flush=True)

if __name__ == "__main__":
    main()
