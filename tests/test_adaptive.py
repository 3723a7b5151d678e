"""Adaptive k (engine/adaptive.py): each step proposes as many tokens as pay for their verify,
from each row's acceptance history and the step-cost curve; the output never changes."""

import numpy as np
import pytest
from test_engine import EOS, MAX_NEW, PROMPTS, REFERENCE, TARGET

from spd_cluster.engine import SpDEngine, SpDSettings
from spd_cluster.engine.adaptive import Acceptance, StepCost, choose_width, expected_tokens
from spd_cluster.engine.proposers import EMPTY, Proposal
from spd_cluster.sessions.torch_session import TorchSession

K = 4
CURVE = StepCost([1.0 + 0.08 * w for w in range(K + 1)])  # a verify of w tokens a row: 8% more per token


class Scripted:
    """A free proposer that knows each prompt's greedy continuation: it proposes it (``right``),
    or the same tokens shifted by one id, which the target never accepts."""

    forwards_per_token = 0

    def __init__(self, right: bool):
        self.right, self.prompt_len, self.ref = right, {}, {}

    def start(self, slot, prompt_ids, key=None):
        self.prompt_len[slot] = len(prompt_ids)
        self.ref[slot] = np.array(REFERENCE[PROMPTS.index(list(prompt_ids))] + [EOS] * (K + 1), dtype=np.int64)

    def propose(self, slots, seqs, limits):
        out = []
        for s, seq, lim in zip(slots, seqs, limits):
            done = len(seq) - self.prompt_len[s]
            want = self.ref[s][done : done + lim]
            out.append(want if self.right else (want + 1) % TARGET.config.vocab_size if lim else EMPTY)
        return Proposal(out)

    def learn(self, slots, verified):
        pass


def run(proposer, adaptive=True, fbs=2, cost=CURVE):
    s = SpDSettings(num_speculative_tokens=K, prefill_seq_len=8, ctx_len=128, max_new_tokens=MAX_NEW,
                    full_batch_size=fbs, adaptive_k=adaptive)
    info = SpDEngine("pld", TorchSession(TARGET, fbs, 128), None, s, proposer=proposer, eos_token_ids=[EOS],
                     step_cost=cost).generate(PROMPTS)
    assert [ids.tolist() for ids in info.generated_ids] == REFERENCE
    return info.perf_metrics


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


def test_a_draft_as_slow_as_the_target_is_not_run():
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
    prefill_calls = sum(-(-(len(p) - 1) // 8) for p in PROMPTS)  # the draft's prefills only
    assert Counting.calls == prefill_calls
    assert sum(info.perf_metrics.proposed_per_position) == 0


def test_the_step_cost_is_measured_on_the_session_and_never_falls_with_width():
    cost = StepCost.measure(TorchSession(TARGET, 2, 128), rows=2, max_width=K + 1)
    assert len(cost.verify_s) == K + 1 and all(c > 0 for c in cost.verify_s)
    assert cost.verify_s == sorted(cost.verify_s)


def test_the_verify_curve_follows_the_steps_and_stays_non_decreasing():
    cost = StepCost([1.0, 1.1, 1.2, 1.3])
    for _ in range(20):
        cost.observe_verify(3, 1.6)  # width 3 dearer in place than measured (a draft beside it)
    assert cost.verify(3) == pytest.approx(1.6, rel=0.02) and cost.verify(4) >= cost.verify(3)
    assert cost.verify(1) == 1.0 and cost.verify(2) == 1.1
    cost.observe_verify(1, 100.0)  # one outlier: at most DRAFT_CLIP times its share
    assert cost.verify(1) == pytest.approx(0.8 + 0.2 * 2.0) and cost.verify(2) >= cost.verify(1)
    cost.observe_verify(9, 5.0)  # past the measured widths: ignored
    assert len(cost.verify_s) == 4
