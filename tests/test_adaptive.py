"""Adaptive k (engine/adaptive.py): each step proposes as many tokens as pay for their verify,
from each row's acceptance history and the step-cost curve; the output never changes. It cannot
lock itself out (a shard starts from the prior, rows are probed, unused widths are re-priced) and
its worst case against target-only is bounded. Speeds here are in modelled time (test_engine's
ModelledTime): the same on any host."""

import numpy as np
import pytest
from engine_world import EOS, MAX_NEW, PROMPTS, REFERENCE, TARGET, ModelledTime, hf_greedy

from spd_cluster.engine import SpDEngine, SpDSettings
from spd_cluster.engine.adaptive import (LOSS_SHARE, Acceptance, AdaptiveWidth, FixedWidth, Step, StepCost,
                                         choose_width, expected_tokens)
from spd_cluster.engine.proposers import EMPTY, Proposal
from spd_cluster.sessions.torch_session import TorchSession

K = 4
CURVE = StepCost([1.0 + 0.08 * w for w in range(K + 1)])  # a verify of w tokens a row: 8% more per token
LONG = 64  # new tokens a prompt in the runs that compare speeds: rows tens of steps long
LONG_REFERENCE = [hf_greedy(TARGET, p, max_new=LONG) for p in PROMPTS]


class Scripted:
    """A proposer that knows each prompt's greedy continuation: it proposes it where ``right``
    (a bool, or a function of the prompt), wrong at the positions where ``miss(position)``, and
    elsewhere the same tokens shifted by one id, which the target never accepts. With
    ``forwards_per_token`` 1 it stands for a draft: each call moves ``clock`` by ``draft_s`` a
    forward, as many forwards as its widest row (``draft_s`` a number, or a function of the call's
    index), and says when a call first catches up on tokens its row emitted while it was not
    asked (``Proposal.catch_up``), as a draft does after a pause."""

    def __init__(self, right=True, reference=REFERENCE, forwards_per_token=0, clock=None, draft_s=0.0,
                 miss=lambda position: False):
        self.right, self.miss = right, miss
        self.refs = {tuple(p): r for p, r in zip(PROMPTS, reference)}
        self.forwards_per_token, self.clock, self.draft_s = forwards_per_token, clock, draft_s
        self.prompt_len, self.ref, self.good = {}, {}, {}
        self.calls, self.seen = 0, {}  # slot -> (sequence length, limit) at its last call

    def start(self, slot, prompt_ids, key=None):
        prompt = tuple(int(t) for t in prompt_ids)
        self.prompt_len[slot] = len(prompt)
        self.ref[slot] = np.array(self.refs[prompt] + [EOS] * (K + 1), dtype=np.int64)
        self.good[slot] = self.right(prompt) if callable(self.right) else self.right

    def propose(self, slots, seqs, limits):
        out = []
        for s, seq, lim in zip(slots, seqs, limits):
            done = len(seq) - self.prompt_len[s]
            want = self.ref[s][done : done + lim].copy()
            wrong = np.array([not self.good[s] or self.miss(len(seq) + i) for i in range(len(want))], dtype=bool)
            want[wrong] = (want[wrong] + 1) % TARGET.config.vocab_size
            out.append(want if lim else EMPTY)
        catch_up = 0
        for s, seq, lim in zip(slots, seqs, limits):
            last_len, last_lim = self.seen.get(s, (len(seq), len(seq)))
            catch_up = max(catch_up, len(seq) - last_len - last_lim - 1)
            self.seen[s] = (len(seq), lim)
        if self.clock is not None and self.forwards_per_token:
            per = self.draft_s(self.calls) if callable(self.draft_s) else self.draft_s
            self.clock.t += per * max(limits)
        self.calls += 1
        return Proposal(out, catch_up=catch_up)

    def learn(self, slots, verified):
        pass


def run(proposer, adaptive=True, fbs=2, cost=CURVE):
    s = SpDSettings(num_speculative_tokens=K, prefill_seq_len=8, ctx_len=128, max_new_tokens=MAX_NEW,
                    full_batch_size=fbs, adaptive_k=adaptive)
    info = SpDEngine("pld", TorchSession(TARGET, fbs, 128), None, s, proposer=proposer, eos_token_ids=[EOS],
                     step_cost=cost).generate(PROMPTS)
    assert [ids.tolist() for ids in info.generated_ids] == REFERENCE
    return info.perf_metrics


def priced_engine(clock, proposer=None, adaptive=True, fbs=2, cost=CURVE, max_new=LONG, mode="pld", spike=None):
    """An engine whose target costs, in modelled time, what ``CURVE`` says (``spike(inputs)``, when
    given, multiplies it); ``cost`` None: the engine measures the curve itself, on that clock."""
    s = SpDSettings(num_speculative_tokens=K, prefill_seq_len=8, ctx_len=128, max_new_tokens=max_new,
                    full_batch_size=fbs, adaptive_k=adaptive)
    price = StepCost(CURVE.verify_s)

    def seconds(inputs):
        return price.verify(np.shape(inputs["input_ids"])[1]) * (spike(inputs) if spike else 1.0)

    target = clock.priced(TorchSession(TARGET, fbs, 128), seconds)
    return SpDEngine(mode, target, None, s, proposer=proposer, eos_token_ids=[EOS], step_cost=cost)


def tokens_per_step(info, rows=None) -> float:
    """Mean tokens a row emitted per step, over ``rows`` (indices) or all."""
    rs = [r for i, r in enumerate(info.results) if rows is None or i in rows]
    steps = [a for r in rs for a in r.accepted_per_step]
    return sum(steps) / len(steps)


def lossless(info, reference=LONG_REFERENCE, rows=None):
    got = [ids.tolist() for ids in info.generated_ids]
    want = reference if rows is None else [reference[i] for i in rows]
    assert got == want


def test_the_width_follows_acceptance_and_cost():
    assert choose_width([0.0, 0.0], [K, K], CURVE, 0) == 0  # nothing is accepted: a plain decode step
    assert choose_width([1.0, 1.0], [K, K], CURVE, 0) == K  # everything is: as many as there are
    assert choose_width([0.9], [2], CURVE, 0) == 2  # never more than a row has
    assert choose_width([0.9], [K], StepCost([1.0, 3.0, 5.0, 7.0, 9.0]), 0) == 0  # verify as dear as decoding
    # a draft forward as dear as the verify itself buys nothing, even when all is accepted
    assert choose_width([1.0], [K], StepCost(CURVE.verify_s, draft_s=1.0), 1) == 0
    assert expected_tokens(0.5, 2) == pytest.approx(1.75)


def test_one_long_draft_call_does_not_price_the_draft_out():
    """A call that also fed the draft a long gap (or waited on its prefill) is one sample: it may
    raise the estimate, but not past the point where proposing would never be tried again."""
    cost = StepCost(CURVE.verify_s)
    cost.observe_draft(5.0, 1)  # the first call warms the draft up: not counted
    assert cost.draft_s == 0
    cost.observe_draft(0.01, 1)
    assert cost.draft_s == 0.01
    cost.observe_draft(30.0, 4)  # 7.5 s a forward, once
    assert cost.draft_s == pytest.approx(0.8 * 0.01 + 0.2 * 0.02)
    for _ in range(10):
        cost.observe_draft(0.04, 4)
    assert cost.draft_s == pytest.approx(0.01, rel=0.05)  # back to what its steps cost


def test_a_draft_call_that_catches_up_is_no_sample_of_its_forwards():
    """A row that proposed nothing for a while feeds its draft every token since, in the first
    forward of its next proposal (a probe after a pause). That cost comes once per pause: priced
    per forward, each probe raised the draft's estimate, so a paused draft stayed paused. The
    policy observes only the calls that did not catch up."""
    policy = AdaptiveWidth(measure=lambda: StepCost(CURVE.verify_s, draft_s=0.01))  # measured: it follows
    policy.reset()
    step = lambda seconds, catch_up: Step([0], np.array([1]), np.array([1]), 1, seconds, 1.0, catch_up)  # noqa: E731
    policy.update(step(0.5, catch_up=20))
    assert policy.cost.draft_s == 0.01
    policy.update(step(0.5, catch_up=0))
    assert policy.cost.draft_s > 0.01


def test_the_draft_says_when_it_catches_up():
    from engine_world import DRAFT

    from spd_cluster.engine.proposers import DraftProposer

    draft = DraftProposer(TorchSession(DRAFT, 1, 128), prefill_seq_len=8)
    seq = np.array(PROMPTS[0], dtype=np.int64)
    draft.start(0, seq)
    got = draft.propose([0], [seq], [3])
    assert got.catch_up == 0  # the prompt's last token
    seq = np.concatenate([seq, got.tokens[0][:1], [7]])  # one accepted, then the target's own token
    assert draft.propose([0], [seq], [3]).catch_up == 0
    for t in range(6):  # steps that proposed nothing: the draft is not fed
        seq = np.concatenate([seq, [11 + t]])
        assert draft.propose([0], [seq], [0]).catch_up == 0
    assert draft.propose([0], [seq], [2]).catch_up == 4  # 6 tokens to feed, 2 of them a step's usual


def test_acceptance_is_the_rows_own_and_fades_back_to_the_jobs():
    a = Acceptance()
    a.start(0), a.start(1)
    for _ in range(6):
        a.learn(0, 4, 4)
        a.learn(1, 4, 0)
    assert a.rate(0) > 0.75 and a.rate(1) < 0.3  # each its own, though the job's rate is in between
    low = a.rate(1)
    for _ in range(30):  # slot 1 proposes nothing: its evidence fades and it probes again later
        a.learn(1, 0, 0)
    assert a.rate(1) > low + 0.2


def test_adaptive_k_proposes_nothing_where_nothing_is_accepted():
    fixed = run(Scripted(right=False), adaptive=False)
    adaptive = run(Scripted(right=False))
    assert fixed.proposed_per_position[0] >= 0.9 * fixed.num_row_steps  # always k (less only at the end)
    assert sum(fixed.accepted_per_position) == sum(adaptive.accepted_per_position) == 0
    # a few early steps probe; after that the rows decode plainly, with an occasional re-probe
    assert adaptive.proposed_per_position[0] < 0.25 * adaptive.num_row_steps
    assert sum(adaptive.proposed_per_position) < 0.1 * sum(fixed.proposed_per_position)


def test_adaptive_k_proposes_everything_where_everything_is_accepted():
    m = run(Scripted(right=True))
    # the fewest steps there can be: k every step, but the last, which has less room
    assert m.num_row_steps == len(PROMPTS) * -(-(MAX_NEW - 1) // (K + 1))
    assert m.accepted_per_position == m.proposed_per_position
    assert m.mean_num_accepted_tokens > K


def test_a_draft_as_slow_as_the_target_is_only_probed():
    """A draft forward as dear as a verify never pays: the draft runs for its prefills and for one
    probe of each new row's text (one forward; a probe of a batch covers its rows), no more."""
    class Counting(TorchSession):
        calls = 0

        def run(self, inputs):
            Counting.calls += 1
            return super().run(inputs)

    s = SpDSettings(num_speculative_tokens=K, prefill_seq_len=8, ctx_len=128, max_new_tokens=MAX_NEW, full_batch_size=2)
    draft = Counting(TARGET, 2, 128)
    info = SpDEngine("draft", TorchSession(TARGET, 2, 128), None, s, draft=draft, eos_token_ids=[EOS],
                     step_cost=StepCost(CURVE.verify_s, draft_s=CURVE.verify(1))).generate(PROMPTS)
    assert [ids.tolist() for ids in info.generated_ids] == REFERENCE
    prefill_calls = sum(-(-(len(p) - 1) // 8) for p in PROMPTS)  # the draft's prefills
    assert prefill_calls < Counting.calls <= prefill_calls + len(PROMPTS)
    m = info.perf_metrics
    assert 0 < m.proposed_per_position[0] <= len(PROMPTS) and m.proposed_per_position[1] == 0


def test_the_step_cost_is_measured_on_the_session_and_never_falls_with_width():
    cost = StepCost.measure(TorchSession(TARGET, 2, 128), rows=2, max_width=K + 1)
    assert len(cost.verify_s) == K + 1 and all(c > 0 for c in cost.verify_s)
    assert cost.verify_s == sorted(cost.verify_s)


@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_the_step_cost_is_measured_on_the_verifies_the_engine_makes(temperature):
    """Greedy, the curve (and the warm-up) times verifies that return token ids; sampling, ones
    that return every position's logits, as the sampling engine's verifies do: a curve timed on
    ids underprices a sampled wide verify, whose logits cross to the host, and the guard with it."""
    session = TorchSession(TARGET, 1, 128)
    seen = []

    class Recorder:
        def __getattr__(self, name):
            return getattr(session, name)

        def run(self, inputs):
            seen.append(bool(inputs.get("argmax", False)))
            return session.run(inputs)

    settings = SpDSettings(num_speculative_tokens=K, prefill_seq_len=16, ctx_len=128, max_new_tokens=4,
                           full_batch_size=1, temperature=temperature, seed=0)
    engine = SpDEngine("pld", Recorder(), None, settings, eos_token_ids=[EOS])
    prefill, before = engine._prefill, []

    def first_prefill(*args):  # what ran before the shard's first prompt: the warm-up and the curve
        if not before:
            before.extend(seen)
        return prefill(*args)

    engine._prefill = first_prefill
    engine.generate([PROMPTS[0]])
    assert engine.warm_passes > 0 and len(engine.policy.cost.verify_s) == K + 1
    assert len(before) >= 8 and set(before) == {temperature == 0}, before


def test_the_verify_curve_follows_the_steps_and_stays_non_decreasing():
    cost = StepCost([1.0, 1.1, 1.2, 1.3])
    for _ in range(60):
        cost.observe_verify(3, 1.6)  # width 3 dearer in place than measured (a draft beside it)
    assert cost.verify(3) == pytest.approx(1.6, rel=0.02) and cost.verify(4) >= cost.verify(3)
    # the widths not verified follow the scale of the whole curve: 1.6 / 1.2 of what was measured
    assert cost.verify(1) == pytest.approx(1.0 * 1.6 / 1.2, rel=0.03)
    assert cost.verify(2) == pytest.approx(1.1 * 1.6 / 1.2, rel=0.03)
    cost.observe_verify(1, 100.0)  # one outlier: at most DRAFT_CLIP times its share
    assert cost.verify(1) <= 1.2 * (1.6 / 1.2) * 1.03 and cost.verify(2) >= cost.verify(1)
    cost.observe_verify(9, 5.0)  # past the measured widths: ignored
    assert len(cost.verify_s) == 4
    assert cost.verify_s == sorted(cost.verify_s)


def test_one_slow_sample_does_not_price_a_width_out_for_good():
    """A width priced up by a transient is not verified again while it looks dear; its estimate
    moves back to the measured curve (scaled) as the other widths are verified."""
    cost = StepCost([1.0 + 0.08 * w for w in range(K + 1)])
    for _ in range(3):
        cost.observe_verify(K + 1, 50.0)  # three slow samples in a row (a pause, a GC)
    dear = cost.verify(K + 1)
    assert dear > 1.5 * CURVE.verify(K + 1)
    assert choose_width([1.0], [K], cost, 0) < K  # priced out for now
    for _ in range(20):
        cost.observe_verify(K, CURVE.verify(K))  # the steps verify the widths that look cheap
    assert choose_width([1.0], [K], cost, 0) == K  # tried again
    for _ in range(40):
        cost.observe_verify(K, CURVE.verify(K))
    assert cost.verify(K + 1) == pytest.approx(CURVE.verify(K + 1), rel=0.02)


def test_fixed_k_is_the_no_op_policy():
    p = FixedWidth()
    p.reset()
    p.start(0)
    assert p.widths([0, 1], [3, 0], 1) == [3, 0] and p.widths([0], [2], 0) == [2]


def test_a_right_proposer_proposes_again_after_a_shard_of_a_wrong_one(monkeypatch):
    """One engine (an actor), two shards: a proposer that is always wrong, then always right.
    The second shard starts from the prior, not from the first one's verdict, and proposes and is
    accepted as much as in an engine of its own (a free proposer and a draft alike)."""
    for costly in (0, 1):
        clock = ModelledTime(monkeypatch)
        cost = StepCost(CURVE.verify_s, draft_s=0.1 * costly)
        prop = Scripted(right=False, reference=LONG_REFERENCE, forwards_per_token=costly, clock=clock, draft_s=0.1)
        engine = priced_engine(clock, prop, cost=cost)
        lossless(engine.generate(PROMPTS))
        prop.right = True
        again = engine.generate(PROMPTS)
        lossless(again)
        fresh = priced_engine(clock, Scripted(True, LONG_REFERENCE, costly, clock, 0.1), cost=cost).generate(PROMPTS)
        assert tokens_per_step(fresh) > 4.5
        assert tokens_per_step(again) >= 0.95 * tokens_per_step(fresh), costly


def test_a_transient_slow_verify_does_not_keep_that_width_priced_out(monkeypatch):
    """The step-cost curve measured by the engine itself (on a modelled clock) and followed: three
    verifies at the full width take five times their cost early in the run (a pause). The width
    is tried again once its estimate has moved back, and the run emits almost as many tokens a
    step as without the pause (it kept emitting k a step where k + 1 were available)."""
    def spiked(inputs, seen=[0]):
        if np.shape(inputs["input_ids"])[1] == K + 1 and np.max(inputs["position_ids"]) > K:  # a decode verify
            seen[0] += 1
            return 5.0 if 2 <= seen[0] <= 4 else 1.0
        return 1.0

    got = {}
    for spike in (None, spiked):
        clock = ModelledTime(monkeypatch)
        info = priced_engine(clock, Scripted(True, LONG_REFERENCE), fbs=1, cost=None, spike=spike).generate(PROMPTS)
        lossless(info)
        got[spike is None] = tokens_per_step(info)
    assert got[True] > 4.5
    assert got[False] >= 0.95 * got[True]


def test_a_transient_slow_draft_does_not_keep_the_draft_priced_out(monkeypatch):
    """A draft whose first counted calls take ten times their cost (a new actor's cold forwards,
    a pause) is priced out; its probes after the pause catch up, so they are no samples of its
    forwards. Its estimate still moves back to the cheapest forwards it was seen to make, and the
    run emits almost as many tokens a step as without the slow calls."""
    got = {}
    for slow in (False, True):
        clock = ModelledTime(monkeypatch)
        draft_s = (lambda call: 1.0 if 1 <= call <= 3 else 0.1) if slow else 0.1
        prop = Scripted(True, LONG_REFERENCE, forwards_per_token=1, clock=clock, draft_s=draft_s)
        info = priced_engine(clock, prop, fbs=1, cost=None).generate(PROMPTS)
        lossless(info)
        got[slow] = tokens_per_step(info)
    assert got[False] > 4.0
    assert got[True] >= 0.9 * got[False]


@pytest.mark.parametrize("costly", [0, 1], ids=["free", "draft"])
def test_mixed_dataset_copy_heavy_part_reaches_what_it_reaches_alone(costly, monkeypatch):
    """One shard, unmatched prompts first (every proposal rejected), copy-heavy ones last (every
    proposal right): on the copy-heavy part, tokens per step are >= 0.9x what those prompts reach
    in a shard of their own."""
    copy_heavy = {tuple(p) for p in PROMPTS[4:]}
    cost = StepCost(CURVE.verify_s, draft_s=0.1 * costly)
    clock = ModelledTime(monkeypatch)
    mixed = priced_engine(clock, Scripted(lambda p: p in copy_heavy, LONG_REFERENCE, costly, clock, 0.1),
                          cost=cost).generate(PROMPTS)
    lossless(mixed)
    alone = priced_engine(clock, Scripted(True, LONG_REFERENCE, costly, clock, 0.1), cost=cost).generate(PROMPTS[4:])
    lossless(alone, rows=range(4, 8))
    assert tokens_per_step(mixed, rows=range(4, 8)) >= 0.9 * tokens_per_step(alone)


def modelled_speed(clock, info) -> float:
    return sum(info.perf_metrics.generated_tokens_per_prompt) / info.perf_metrics.e2e_time


@pytest.mark.parametrize("costly", [0, 1], ids=["free", "draft"])
def test_worst_case_against_target_only_is_bounded(costly, monkeypatch):
    """Open prompts, a proposer that is always wrong (the worst case: every probe and every
    optimistic step is lost): adaptive k runs at >= 0.97x target-only in modelled time (the
    guard's bound, engine/adaptive.py: >= (1 - LOSS_SHARE) less one probe), where k fixed loses
    far more."""
    clock = ModelledTime(monkeypatch)
    draft_s = 0.3 * CURVE.verify(1) * costly  # a draft forward at 30% of a plain step

    def wrong(adaptive):
        prop = Scripted(False, LONG_REFERENCE, costly, clock, draft_s)
        info = priced_engine(clock, prop, adaptive, cost=StepCost(CURVE.verify_s, draft_s)).generate(PROMPTS)
        lossless(info)
        return modelled_speed(clock, info), info.perf_metrics

    base = priced_engine(clock, mode="baseline").generate(PROMPTS)
    lossless(base)
    target_only = modelled_speed(clock, base)
    adaptive, m = wrong(True)
    fixed, _ = wrong(False)
    assert adaptive >= 0.97 * target_only and adaptive >= (1 - LOSS_SHARE) * 0.99 * target_only
    assert fixed < 0.9 * target_only
    assert sum(m.proposed_per_position) > 0  # it kept probing


@pytest.mark.parametrize("costly", [0, 1], ids=["free", "draft"])
def test_copy_heavy_within_0_9_of_the_best_fixed_k(costly, monkeypatch):
    """Copy-heavy prompts whose proposals go wrong at every seventh position: adaptive k reaches
    >= 0.9x the modelled speed of the best fixed k (1..K)."""
    clock = ModelledTime(monkeypatch)
    draft_s = 0.1 * costly

    def speed(adaptive, k=K):
        prop = Scripted(True, LONG_REFERENCE, costly, clock, draft_s, miss=lambda p: p % 7 == 3)
        eng = priced_engine(clock, prop, adaptive, cost=StepCost(CURVE.verify_s, draft_s))
        eng.k = k
        info = eng.generate(PROMPTS)
        lossless(info)
        return modelled_speed(clock, info)

    best_fixed = max(speed(False, k) for k in range(1, K + 1))
    assert speed(True) >= 0.9 * best_fixed


def test_a_new_shard_starts_from_the_prior():
    policy = AdaptiveWidth(StepCost(CURVE.verify_s))
    policy.reset()
    policy.start(0)
    for _ in range(50):
        policy.update(Step([0], np.array([K]), np.array([0]), 0, 0.0, 0.0))  # all rejected
    assert policy.acceptance.rate(0) < 0.1 and policy.widths([0], [K], 0) == [0]
    policy.reset()
    policy.start(0)
    assert policy.acceptance.rate(0) == pytest.approx(0.6) and policy.widths([0], [K], 0)[0] > 0


@pytest.mark.parametrize("costly", [0, 1], ids=["free", "draft"])
def test_a_row_whose_text_turns_repetitive_proposes_again(costly, monkeypatch):
    """One row, its proposals wrong for its first 24 tokens (speculation pauses), right after
    (its text changed): it proposes again and is accepted within a few steps."""
    clock = ModelledTime(monkeypatch)
    prompt = PROMPTS[1]
    prop = Scripted(True, LONG_REFERENCE, costly, clock, 0.1, miss=lambda p: p < len(prompt) + 24)
    info = priced_engine(clock, prop, fbs=1, cost=StepCost(CURVE.verify_s, 0.1 * costly)).generate([prompt])
    lossless(info, rows=[1])
    steps = info.results[0].accepted_per_step
    assert max(steps[:20]) == 1  # paused while everything was rejected
    assert np.mean(steps[-6:]) >= 4.5  # and back at full width once the text turned
