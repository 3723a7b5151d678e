"""Adaptive k: how many tokens a step proposes, so that speculation never loses.

Each step the engine picks the proposal width m (0 = a plain decode step) that maximises the
expected tokens the batch emits per second of the step:

    sum_i E(a_i, min(m, avail_i)) / (verify_s(m + 1) + forwards_per_token * m * draft_s)

where ``E(a, m) = 1 + a + ... + a^m`` is what a row emits when each proposal is accepted with
probability ``a`` given those before it were (``Acceptance``: the row's own history, shrunk
towards the job's), ``avail_i`` what the row may (or, for a free proposer, did) propose, and
``StepCost`` the target's cost of verifying m + 1 tokens a row, measured before the first step
and followed as the job runs, plus the draft's cost of one forward, measured as the job runs.
Any m keeps the output: it only changes how much of it one step can emit.
"""

from __future__ import annotations

import time
from typing import Sequence

import numpy as np

PRIOR = 0.6  # acceptance before any evidence
PRIOR_WEIGHT = 2.0  # pseudo-trials of the prior (job level) and of the job's rate (row level)
DECAY = 0.85  # per step, a row's evidence fades: a row that stopped proposing probes again later
JOB_DECAY = 0.99
DRAFT_CLIP = 2.0  # a cost sample (draft or verify) counts at most this many times the estimate


class StepCost:
    """Seconds of one target verify of w tokens a row (w = 1..), and of one draft forward."""

    def __init__(self, verify_s: Sequence[float], draft_s: float = 0.0):
        if not len(verify_s) or min(verify_s) <= 0:
            raise ValueError(f"verify_s needs a positive cost for width 1 and up, got {list(verify_s)}")
        self.verify_s = [float(c) for c in verify_s]
        self.draft_s = float(draft_s)
        self._warm = draft_s > 0  # a given draft cost needs no warm-up call

    def verify(self, width: int) -> float:
        c = self.verify_s
        if width <= len(c):
            return c[width - 1]
        slope = (c[-1] - c[0]) / (len(c) - 1) if len(c) > 1 else 0.0
        return c[-1] + slope * (width - len(c))  # past what was measured: linear

    def observe_draft(self, seconds: float, forwards: int) -> None:
        """One proposal call of ``forwards`` draft forwards took ``seconds``. A call may also feed
        the draft every token since its last one (a row that proposed nothing for a while), so
        one sample moves the estimate by at most DRAFT_CLIP times its share: a rare long call
        must not price the draft out for good (it would then never be observed again). The first
        call warms the draft's decode path up (a new actor's first forwards) and is not counted."""
        if forwards > 0:
            if not self._warm:
                self._warm = True
                return
            per = seconds / forwards
            if self.draft_s == 0:
                self.draft_s = per
            else:
                self.draft_s = 0.8 * self.draft_s + 0.2 * min(per, DRAFT_CLIP * self.draft_s)

    def observe_verify(self, width: int, seconds: float) -> None:
        """A verify of ``width`` tokens a row took ``seconds`` as the job runs: the curve measured
        before the first step follows what steps cost in place (a draft actor beside the target on
        shared cores makes them dearer than on a quiet device), one sample at most DRAFT_CLIP
        times its share, and stays non-decreasing."""
        c = self.verify_s
        if not 1 <= width <= len(c):
            return
        i = width - 1
        c[i] = 0.8 * c[i] + 0.2 * min(seconds, DRAFT_CLIP * c[i])
        for j in range(i + 1, len(c)):
            c[j] = max(c[j], c[i])
        for j in range(i):
            c[j] = min(c[j], c[i])

    @classmethod
    def measure(cls, session, rows: int, max_width: int, reps: int = 2, heads: bool = False) -> "StepCost":
        """Time verifies of ``rows`` rows at widths 1..max_width on ``session`` (slots 0..rows-1,
        positions from 0: a fresh session, whose prefills write those positions again)."""
        widths = list(range(1, max_width + 1))
        best = {}
        for rep in range(reps + 1):  # the first pass warms up
            for w in widths:
                call = {"input_ids": np.zeros((rows, w), np.int64),
                        "position_ids": np.tile(np.arange(w, dtype=np.int64), (rows, 1)),
                        "batch_index": np.arange(rows, dtype=np.int64)[:, None],
                        "num_logits_to_keep": np.arange(w, dtype=np.int64)[:, None],
                        "argmax": np.array(True), "head_guesses": np.array(heads)}
                t0 = time.perf_counter()
                session.run(call)
                if rep:
                    best[w] = min(best.get(w, np.inf), time.perf_counter() - t0)
        curve = [best[w] for w in widths]
        # a step never costs less for being wider: noise must not make it look so
        return cls([max(curve[: i + 1]) for i in range(len(curve))])


class Acceptance:
    """Per slot, the chance that a proposal is accepted given the ones before it were."""

    def __init__(self):
        self.rows: dict[int, list[float]] = {}  # slot -> [accepted, trials]
        self.job = [PRIOR * PRIOR_WEIGHT, PRIOR_WEIGHT]

    def start(self, slot: int) -> None:
        self.rows[slot] = [0.0, 0.0]

    def rate(self, slot: int) -> float:
        job = self.job[0] / self.job[1]
        hit, tried = self.rows.get(slot, (0.0, 0.0))
        return (hit + PRIOR_WEIGHT * job) / (tried + PRIOR_WEIGHT)

    def learn(self, slot: int, proposed: int, accepted: int) -> None:
        """A verify of ``proposed`` tokens accepted the first ``accepted``: that many successes,
        and one failure when it stopped short."""
        row = self.rows.setdefault(slot, [0.0, 0.0])
        row[0] *= DECAY
        row[1] *= DECAY
        if proposed:
            tried = accepted + (accepted < proposed)
            row[0] += accepted
            row[1] += tried
            self.job = [JOB_DECAY * self.job[0] + accepted, JOB_DECAY * self.job[1] + tried]


def expected_tokens(rate: float, m: int) -> float:
    """1 + rate + ... + rate^m: what a row emits when it proposes m tokens."""
    return m + 1.0 if rate >= 1.0 else (1.0 - rate ** (m + 1)) / (1.0 - rate)


def choose_width(rates: Sequence[float], avail: Sequence[int], cost: StepCost, forwards_per_token: int) -> int:
    """The m that maximises expected tokens per second of the step (the smallest such m).
    Plain floats: it runs every step, on the host, between two device calls."""
    top = max(avail, default=0)
    best_m, best = 0, -1.0
    tokens = float(len(rates))  # m = 0: one token a row
    power = [1.0] * len(rates)  # rate^m per row
    for m in range(top + 1):
        if m:
            for i, (r, a) in enumerate(zip(rates, avail)):
                if m <= a:
                    power[i] *= r
                    tokens += power[i]
        value = tokens / (cost.verify(m + 1) + forwards_per_token * m * cost.draft_s)
        if value > best * (1 + 1e-9):
            best_m, best = m, value
    return best_m
