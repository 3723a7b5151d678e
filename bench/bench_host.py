"""Host milliseconds per engine step, every mode, with sessions whose forwards cost nothing.

A ``FreeSession`` checks its inputs as every session does and hands back preallocated outputs:
logits of the real vocabulary size (fixed random values, so argmaxes vary) or, with ``argmax``,
their argmax (the device's work, done once here), so what a step costs here is the engine's own
work around the device: proposing, building the call, verifying, bookkeeping, adaptive k.
On a card a 1B-class decode step takes ~10 ms; this is what the host adds to each.

    python bench/bench_host.py                   # fbs 1 and 4, vocabularies 49k and 152k
    python bench/bench_host.py --steps 400 --vocab 151936
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import this_tree  # noqa: F401  (this tree's spd_cluster, not an installed one)
from spd_cluster.engine import SpDEngine, SpDSettings, StepCost
from spd_cluster.sessions.base import check_inputs


class FreeSession:
    def __init__(self, full_batch_size: int, ctx_len: int, vocab_size: int, num_heads: int = 0, seed: int = 0):
        self.full_batch_size, self.ctx_len, self.vocab_size, self.num_heads = full_batch_size, ctx_len, vocab_size, num_heads
        self.eos_token_ids: list[int] = []
        rng = np.random.default_rng(seed)
        tail = (num_heads + 1,) if num_heads else ()
        self._pool = rng.standard_normal((full_batch_size, 16) + tail + (vocab_size,), dtype=np.float32)
        self._tokens = self._pool[:, :, 0].argmax(-1) if num_heads else self._pool.argmax(-1)
        self._heads = self._pool[:, 0, 1:].argmax(-1), np.full((full_batch_size, num_heads), 0.5, np.float32)

    def run(self, inputs):
        c = check_inputs(inputs, self.full_batch_size, self.ctx_len)
        b, n = c.input_ids.shape[0], c.num_logits
        if not c.argmax:
            return {"logits": self._pool[:b, :n] if c.head_guesses or not self.num_heads else self._pool[:b, :n, 0]}
        out = {"tokens": self._tokens[:b, :n]}
        if self.num_heads and c.head_guesses:
            out["head_tokens"], out["head_probs"] = self._heads[0][:b], self._heads[1][:b]
        return out


def prompts(count: int, length: int, seed: int) -> list[list[int]]:
    """Token-id prompts with repeats, so prompt lookup finds matches."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        motif = rng.integers(5, 400, 12).tolist()
        out.append((motif * (length // 12 + 1))[:length])
    return out


def host_ms_per_step(mode: str, fbs: int, vocab: int, steps: int, k: int) -> float:
    s = SpDSettings(num_speculative_tokens=k, prefill_seq_len=32, ctx_len=1024, max_new_tokens=steps,
                    full_batch_size=fbs, ignore_eos=True)
    target = FreeSession(fbs, s.ctx_len, vocab, num_heads=k if mode == "multiproj" else 0)
    draft = FreeSession(fbs, s.ctx_len, vocab, seed=1) if mode == "draft" else None
    # a verify that costs a little more per token, as on a card: adaptive k runs its choice each step
    cost = StepCost([0.010 * (1 + 0.05 * w) for w in range(k + 1)], draft_s=0.001)
    engine = SpDEngine(mode, target, None, s, draft=draft, eos_token_ids=[], step_cost=cost)
    work = prompts(fbs, 200, seed=fbs)
    engine.generate(work[:1])  # warm-up
    t0 = time.perf_counter()
    info = engine.generate(work)
    wall = time.perf_counter() - t0
    return 1000.0 * wall / max(info.perf_metrics.decode_iterations, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200, help="new tokens per prompt")
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--vocab", type=int, nargs="+", default=[49152, 151936])
    ap.add_argument("--fbs", type=int, nargs="+", default=[1, 4])
    args = ap.parse_args()
    modes = ["baseline", "pld", "draft", "multiproj", "suffix"]
    print(f"host ms per step (k={args.k}, {args.steps} new tokens per prompt, sessions that cost nothing)")
    print(f"{'vocab':>7} {'fbs':>4} " + " ".join(f"{m:>10}" for m in modes))
    for vocab in args.vocab:
        for fbs in args.fbs:
            row = [host_ms_per_step(m, fbs, vocab, args.steps, args.k) for m in modes]
            print(f"{vocab:>7} {fbs:>4} " + " ".join(f"{v:>10.3f}" for v in row))


if __name__ == "__main__":
    main()
