"""A session's warm-up: the verify calls a job will make, run before its first shard.

A model's first forwards after it loads run slower than the rest (weights paged in, caches and
allocators filling; on these CPUs the first run after a load took up to 50% longer a step). A
shard's timing must not carry that, and every mode must start alike: adaptive k's step-cost
measurement (``StepCost.measure``) used to be the only warm-up, so a speculative job started
warm and its target-only baseline cold. ``warm_up`` runs passes over widths 1..max_width until
one pass takes within SETTLED of the one before (at least MIN_PASSES passes and MIN_CALLS calls,
at most MAX_PASSES passes), as vLLM runs its profiling and capture passes before it serves. The
engine calls it once, before its first shard, over the widths it will verify (1..k + 1: a
compiled session, QEfficient's, takes no other), so a target-only engine runs MIN_CALLS one-token
calls at least; a draft actor warms its draft over the calls a draft makes (one or two tokens a
row, the last logits kept).
"""

from __future__ import annotations

from time import perf_counter

import numpy as np

from ..sessions.base import SessionCall

MIN_PASSES, MAX_PASSES = 2, 6
MIN_CALLS = 8  # a pass of one width is repeated up to this many calls
SETTLED = 0.15  # a pass within this share of the one before: warm


def verify_call(rows: int, width: int, heads: bool = False, last_only: bool = False, argmax: bool = True) -> dict:
    """A verify of ``width`` tokens in each of ``rows`` slots (0..rows-1) at positions 0..width-1:
    a fresh session's, whose prefills write those positions again. ``last_only``: the last
    token's logits kept (a draft's call), not every token's. ``argmax``: token ids back (a greedy
    engine's verify), or every kept position's logits (a sampling one's: they cross to the host,
    which costs more the wider the verify)."""
    keep = 1 if last_only else np.arange(width, dtype=np.int64)[:, None]
    return SessionCall(np.zeros((rows, width), np.int64), np.tile(np.arange(width, dtype=np.int64), (rows, 1)),
                       np.arange(rows, dtype=np.int64), num_logits_to_keep=keep,
                       argmax=argmax, head_guesses=heads).as_inputs()


def warm_up(session, rows: int, max_width: int, heads: bool = False, last_only: bool = False,
            argmax: bool = True) -> int:
    """Run passes of verifies at widths 1..max_width until they settle; returns the passes run."""
    calls = [verify_call(rows, w, heads, last_only, argmax) for w in range(1, max_width + 1)]
    calls = calls * -(-MIN_CALLS // (MIN_PASSES * len(calls)))  # MIN_PASSES passes make MIN_CALLS calls
    last = None
    for done in range(1, MAX_PASSES + 1):
        t0 = perf_counter()
        for call in calls:
            session.run(call)
        took = perf_counter() - t0
        if done >= MIN_PASSES and last is not None and abs(took - last) <= SETTLED * last:
            return done
        last = took
    return MAX_PASSES
