"""Adaptive k: how many tokens a step proposes, so that speculation never loses much.

The engine asks a ``WidthPolicy`` each step how many of the tokens each row may propose it
should verify, and tells it what the step found (``update``). ``reset`` starts a shard (each
``generate``). Any width keeps the output: it only changes how much of it one step can emit.

``FixedWidth`` (``spd.adaptive_k: false``, the seed scripts' default) is the no-op policy: every
row proposes all it may, the seed's meaning of k. ``AdaptiveWidth`` picks the width m (0 = a
plain decode step) that maximises the expected tokens the batch emits per second of the step:

    sum_i E(a_i, min(m, avail_i)) / (verify_s(m + 1) + forwards_per_token * m * draft_s)

where ``E(a, m) = 1 + a + ... + a^m`` is what a row emits when each proposal is accepted with
probability ``a`` given those before it were (``Acceptance``: the row's own history, shrunk
towards the shard's, which starts from PRIOR at each reset), ``avail_i`` what the row may (or,
for a free proposer, did) propose, and ``StepCost`` the target's cost of verifying m + 1 tokens a
row, measured before the first step and followed as the job runs, plus the draft's cost of one
forward. Greedy or sampled alike: the acceptance is learned from the verifier's outcomes (the
rejection sampler's when sampling), and no width changes what the verifier keeps.

It cannot lock itself out:
  * a shard starts from PRIOR, not from the last shard's verdict;
  * a row proposes (a probe: ``probe_width``) at its first chance whatever the estimates say (its
    text is new), and a row the estimates have stopped keeps being probed at a cost of at most
    EXPLORE_SHARE of the shard's time, so a row whose text turns repetitive learns it again;
  * widths of the step-cost curve not verified lately move back towards the measured curve
    (scaled by what verifies cost in place, ``StepCost.observe_verify``), and a draft's cost,
    on steps that did not sample it, back towards the cheapest forwards it was seen to make
    (``StepCost.recover_draft``: a paused draft's probes catch up and are no samples), so one
    slow sample cannot price a width or the draft out for good.

Worst case against target-only (the guard). Per shard, in the cost model, let T be the time the
steps took and T0 the time plain decode steps would take to emit the same tokens (a step that
emitted 1 + a_i tokens a row is worth 1 + mean(a_i) plain steps). A width is used only while,
even if every proposal of it is rejected, T - T0 stays within ALLOWANCE (one probe) plus
LOSS_SHARE of T. Hence, whatever is accepted and however wrong the estimates are,

    T <= (T0 + B) / (1 - LOSS_SHARE),    B = one probe (probe_cost),

so a shard runs at >= (1 - LOSS_SHARE) * T0 / (T0 + B) of target-only speed: >= 0.98x less one
probe (a fraction of one plain step: at 50 plain steps, >= 0.97x). Probes are part of T - T0,
so they are inside the same bound.

Against the best fixed k (copy-heavy text, where proposals are accepted): the guard never binds
after the first accepted step (each accepted token banks a plain step), probes never run (the
estimates already propose), and with a cost curve that matches the device the width maximises
the expected tokens per second, which a fixed width cannot exceed for the same acceptance. What
is lost is the estimator's lag: a shard's first steps, from PRIOR, and a row whose shard rate is
low until its own evidence outweighs it (a couple of steps: PRIOR_WEIGHT pseudo-trials), so a
shard of rows tens of steps long stays >= 0.9x of the best fixed k (tests/test_adaptive.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from time import perf_counter
from typing import Callable, Optional, Protocol, Sequence

import numpy as np


PRIOR = 0.6  # acceptance before any evidence (each shard starts here)
PRIOR_WEIGHT = 2.0  # pseudo-trials of the prior (shard level) and of the shard's rate (row level)
DECAY = 0.85  # per step, a row's evidence fades towards the shard's rate
JOB_DECAY = 0.99  # per proposing step, the shard's evidence fades
DRAFT_CLIP = 2.0  # a cost sample (draft or verify) counts at most this many times the estimate
RECOVER = 0.1  # per verify, a width not verified moves this share of the way back to the measured curve, scaled
LOSS_SHARE = 0.02  # the guard: speculation may cost at most this share of a shard's time beyond target-only
EXPLORE_SHARE = 0.01  # probes of rows the estimates stopped: at most this share of the time
DRAFT_PRIOR = 0.5  # a draft's forward, in plain steps, that an unsampled estimate returns to at most
PROBE_SHARE = 0.25  # a probe may verify as many tokens as cost this share of a plain step (at least one)


class StepCost:
    """Seconds of one target verify of w tokens a row (w = 1..), and of one draft forward."""

    def __init__(self, verify_s: Sequence[float], draft_s: float = 0.0):
        if not len(verify_s) or min(verify_s) <= 0:
            raise ValueError(f"verify_s needs a positive cost for width 1 and up, got {list(verify_s)}")
        self.measured = [float(c) for c in verify_s]  # the curve measured (or given)
        self.est = list(self.measured)  # each width's estimate as the job runs
        self.scale = 1.0  # what verifies cost in place over what was measured
        self._view = list(self.measured)
        self._refresh()
        self.draft_s = float(draft_s)
        self.draft_floor = self.draft_s  # the cheapest forward observed (recover_draft)
        self._warm = draft_s > 0  # a given draft cost needs no warm-up call

    @property
    def verify_s(self) -> list[float]:
        return list(self._view)

    def _refresh(self) -> None:
        # a step never costs less for being wider, nor more than that many one-token verifies
        # (w decode steps would do its work): noise, a loaded host, must not make it look so
        rise = np.maximum.accumulate(self.est)
        self._view = list(np.minimum(rise, self.est[0] * np.arange(1, len(rise) + 1)))

    def verify(self, width: int) -> float:
        c = self._view
        if width <= len(c):
            return c[width - 1]
        slope = (c[-1] - c[0]) / (len(c) - 1) if len(c) > 1 else 0.0
        return c[-1] + slope * (width - len(c))  # past what was measured: linear

    def observe_draft(self, seconds: float, forwards: int) -> None:
        """One proposal call of ``forwards`` draft forwards took ``seconds``. A call that first
        fed the draft every token since its last one (a row that proposed nothing for a while:
        ``Step.catch_up``) is not observed at all, since that cost comes once per pause, and
        pricing forwards by it kept a paused draft paused; any other one sample moves the estimate
        by at most DRAFT_CLIP times its share, so a rare long call (a pause of the host) cannot
        price the draft out for good. The first call warms the draft's decode path up (a new
        actor's first forwards) and is not counted."""
        if forwards > 0:
            if not self._warm:
                self._warm = True
                return
            per = seconds / forwards
            if self.draft_s == 0:
                self.draft_s = per
            else:
                self.draft_s = 0.8 * self.draft_s + 0.2 * min(per, DRAFT_CLIP * self.draft_s)
            self.draft_floor = per if self.draft_floor == 0 else min(self.draft_floor, per)

    def recover_draft(self) -> None:
        """A step that made no sample of the draft's forwards (it did not propose, or its call
        caught up after a pause) moves the draft's estimate RECOVER of the way back to the
        cheapest forward observed, or to DRAFT_PRIOR plain steps where every forward observed
        was dearer (a draft whose first counted calls were all slow: a new actor's cold
        forwards, a pause of the host). A draft priced out by a transient is then tried again
        within a few tens of steps, as a width of the verify curve is; one that really is dearer
        is re-measured by the steps that try it, within the guard."""
        if self.draft_floor > 0:
            self.draft_s += RECOVER * (min(self.draft_floor, DRAFT_PRIOR * self.verify(1)) - self.draft_s)

    def observe_verify(self, width: int, seconds: float) -> None:
        """A verify of ``width`` tokens a row took ``seconds`` as the job runs. Its width's
        estimate follows (one sample at most DRAFT_CLIP times its share), and so does the scale of
        the whole curve (a draft actor beside the target on shared cores makes every width dearer
        than on the quiet device it was measured on); every other width moves RECOVER of the way
        back to its measured cost times that scale. So a width priced out by a transient (a slow
        sample, a pause) is priced as measured again within a few tens of steps, and is tried
        again where it pays; a width that really is dearer is re-measured that way, at the
        bounded cost of the steps that try it."""
        c = self.est
        if not 1 <= width <= len(c):
            return
        i = width - 1
        c[i] = 0.8 * c[i] + 0.2 * min(seconds, DRAFT_CLIP * c[i])
        self.scale = 0.8 * self.scale + 0.2 * (c[i] / self.measured[i])
        for j in range(len(c)):
            if j != i:
                c[j] += RECOVER * (self.measured[j] * self.scale - c[j])
        self._refresh()

    @classmethod
    def measure(cls, session, rows: int, max_width: int, reps: int = 2, heads: bool = False,
                argmax: bool = True) -> "StepCost":
        """Time verifies of ``rows`` rows at widths 1..max_width on ``session`` (slots 0..rows-1,
        positions from 0: a fresh session, whose prefills write those positions again), as the
        engine makes them: ``argmax`` False for a sampling engine, whose verifies bring every
        position's logits to the host (a greedy curve underprices its wide verifies)."""
        from .warmup import verify_call

        widths = list(range(1, max_width + 1))
        best = {}
        for rep in range(reps + 1):  # the first pass warms up
            for w in widths:
                call = verify_call(rows, w, heads, argmax=argmax)
                t0 = perf_counter()
                session.run(call)
                if rep:
                    best[w] = min(best.get(w, np.inf), perf_counter() - t0)
        curve = [best[w] for w in widths]
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


@dataclass
class Step:
    """What one verify step found, as the engine hands it to its width policy."""

    slots: Sequence[int]
    proposed: np.ndarray  # [B] tokens each row had verified
    accepted: np.ndarray  # [B] of those, accepted
    forwards: int  # draft forwards the step's proposals cost (0 for a free proposer)
    draft_s: float  # seconds in the proposer
    verify_s: float  # seconds of the verify
    catch_up: int = 0  # tokens the draft fed first to catch up (Proposal.catch_up): draft_s is no sample then


class WidthPolicy(Protocol):
    """How many of the tokens each row may propose a step verifies."""

    def reset(self) -> None:
        """A new shard (each ``generate``): estimates start from the prior again."""

    def start(self, slot: int) -> None:
        """A new prompt takes ``slot``."""

    def widths(self, slots: Sequence[int], avail: Sequence[int], forwards_per_token: int) -> list[int]:
        """Each row's ``avail`` (what it may, or did, propose), cut to what the step verifies."""

    def update(self, step: Step) -> None:
        """What the step found."""


class FixedWidth:
    """k fixed: every row proposes all it may (k, or what it may still emit): the seed's k."""

    def reset(self) -> None:
        pass

    def start(self, slot: int) -> None:
        pass

    def widths(self, slots, avail, forwards_per_token):
        return list(avail)

    def update(self, step: Step) -> None:
        pass


class AdaptiveWidth:
    """The width that maximises expected tokens per second, with probes and the loss guard
    (module docstring). ``cost`` given stays the model, verify and draft costs alike (tests,
    benchmarks: modelled costs, whatever the host's timing); otherwise
    ``measure()`` makes it at the first ``reset`` (not before: in a pair the draft actor may still
    be loading) and it follows what the verifies cost."""

    def __init__(self, cost: Optional[StepCost] = None, measure: Optional[Callable[[], StepCost]] = None):
        if cost is None and measure is None:
            raise ValueError("AdaptiveWidth needs a step-cost curve or a way to measure one")
        self.cost, self.measure, self.follow = cost, measure, cost is None
        self._fresh_shard()

    def _fresh_shard(self) -> None:
        self.acceptance = Acceptance()
        self.new: set[int] = set()  # slots whose row has not proposed yet
        self.elapsed = 0.0  # T: modelled seconds of the shard's steps
        self.behind = 0.0  # T - T0: modelled seconds behind target-only
        self.credit = 0.0  # probe budget: EXPLORE_SHARE of the time, less the probes' cost
        self.probing = False
        self.probes = self.steps = 0
        self.width_sum = 0  # proposal widths the steps verified (mean: width_sum / steps)

    def reset(self) -> None:
        if self.cost is None:
            self.cost = self.measure()
        self._fresh_shard()

    def start(self, slot: int) -> None:
        self.acceptance.start(slot)
        self.new.add(slot)

    def extra(self, m: int, forwards_per_token: int) -> float:
        """Modelled seconds a step proposing m tokens a row costs beyond a plain step."""
        c = self.cost
        return c.verify(m + 1) + forwards_per_token * m * c.draft_s - c.verify(1)

    def probe_cost(self, forwards_per_token: int) -> float:
        return max(self.extra(1, forwards_per_token), PROBE_SHARE * self.cost.verify(1))

    def probe_width(self, top: int, forwards_per_token: int) -> int:
        """The widest probe within probe_cost (one token at least): more of a row's text is
        checked where a wider verify is nearly free (prompt lookup on a device)."""
        budget = self.probe_cost(forwards_per_token)
        m = 1
        while m < top and self.extra(m + 1, forwards_per_token) <= budget:
            m += 1
        return m

    def affordable(self, m: int, forwards_per_token: int) -> int:
        """m, or less: the widest whose every proposal rejected keeps the shard within the guard."""
        room = self.probe_cost(forwards_per_token) + LOSS_SHARE * self.elapsed - self.behind
        while m > 0 and self.extra(m, forwards_per_token) > room:
            m -= 1
        return m

    def widths(self, slots, avail, forwards_per_token):
        if not any(avail):
            return list(avail)
        rates = [self.acceptance.rate(s) for s in slots]
        m = choose_width(rates, avail, self.cost, forwards_per_token)
        probe = False
        if m == 0:
            probe_cost = self.probe_cost(forwards_per_token)
            self.credit = min(self.credit, 2 * probe_cost)
            if self.credit >= probe_cost or any(a and s in self.new for s, a in zip(slots, avail)):
                m, probe = self.probe_width(max(avail), forwards_per_token), True
        m = self.affordable(m, forwards_per_token)
        self.probing = probe and m > 0
        return [min(a, m) for a in avail]

    def update(self, step: Step) -> None:
        c = self.cost
        width = int(max(step.proposed, default=0)) + 1
        plain = c.verify(1)
        spent = c.verify(width) + step.forwards * c.draft_s
        self.elapsed += spent
        self.behind += spent - plain - plain * float(np.sum(step.accepted)) / max(len(step.slots), 1)
        self.credit += EXPLORE_SHARE * spent - (spent - plain if self.probing else 0.0)
        self.probes += self.probing
        self.probing = False
        self.steps += 1
        self.width_sum += width - 1
        for slot, m, a in zip(step.slots, step.proposed, step.accepted):
            self.acceptance.learn(slot, int(m), int(a))
            if m:
                self.new.discard(slot)
        if self.follow:  # a given curve is the model: times observed in place do not move it
            c.observe_verify(width, step.verify_s)
            if step.forwards and not step.catch_up:  # a catch-up is paid once per pause, not per forward
                c.observe_draft(step.draft_s, step.forwards)
            else:
                c.recover_draft()
