"""The overlapped draft (engine/overlap.py): the same tokens as the sequential pair and the target
alone; a guess is used only when the whole window was accepted and the target's next token was
the draft's, and thrown away otherwise; timed sessions really run at once."""

import time

import numpy as np
import pytest
from engine_world import DRAFT, EOS, MAX_NEW, PROMPTS, REFERENCE, TARGET

from spd_cluster.engine import SpDEngine, SpDSettings
from spd_cluster.engine.overlap import OverlappedDraft
from spd_cluster.sessions.timed import TimedSession
from spd_cluster.sessions.torch_session import TorchSession


class Counting(TorchSession):
    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.calls = 0

    def run(self, inputs):
        self.calls += 1
        return super().run(inputs)


def run(draft_model, overlap, fbs, wrap=lambda s: s, k=3):
    s = SpDSettings(num_speculative_tokens=k, prefill_seq_len=8, ctx_len=128, max_new_tokens=MAX_NEW,
                    full_batch_size=fbs, adaptive_k=False, overlap_draft=overlap)
    draft = Counting(draft_model, fbs, 128)
    engine = SpDEngine("draft", wrap(TorchSession(TARGET, fbs, 128)), None, s, draft=wrap(draft), eos_token_ids=[EOS])
    t0 = time.perf_counter()
    info = engine.generate(PROMPTS)
    return info, engine.proposer, draft.calls, time.perf_counter() - t0


@pytest.mark.parametrize("fbs", [1, 3])
@pytest.mark.parametrize("which", ["other", "same"])
def test_overlap_gives_the_sequential_pairs_tokens(fbs, which):
    model = DRAFT if which == "other" else TARGET
    seq, _, _, _ = run(model, False, fbs)
    ovl, prop, _, _ = run(model, True, fbs)
    assert isinstance(prop, OverlappedDraft)
    assert [x.tolist() for x in ovl.generated_ids] == [x.tolist() for x in seq.generated_ids] == REFERENCE
    assert ovl.perf_metrics.accepted_per_position == seq.perf_metrics.accepted_per_position


class Recording:
    """A proposer that records every window its inner proposer hands the verify."""

    def __init__(self, inner):
        self.inner, self.windows = inner, []
        self.forwards_per_token = inner.forwards_per_token

    def start(self, slot, prompt_ids, key=None):
        self.inner.start(slot, prompt_ids, key)

    def propose(self, slots, seqs, limits):
        out = self.inner.propose(slots, seqs, limits)
        self.windows.append([(s, len(q), t.tolist()) for s, q, t in zip(slots, seqs, out.tokens)])
        return out

    def learn(self, slots, verified):
        self.inner.learn(slots, verified)


def windows(draft_model, overlap, fbs):
    from spd_cluster.engine.proposers import DraftProposer

    s = SpDSettings(num_speculative_tokens=3, prefill_seq_len=8, ctx_len=128, max_new_tokens=MAX_NEW,
                    full_batch_size=fbs, adaptive_k=False)
    draft = Counting(draft_model, fbs, 128)
    inner = DraftProposer(draft, 8)
    rec = Recording(OverlappedDraft(inner) if overlap else inner)
    info = SpDEngine("draft", TorchSession(TARGET, fbs, 128), None, s, proposer=rec, eos_token_ids=[EOS]).generate(PROMPTS)
    assert [x.tolist() for x in info.generated_ids] == REFERENCE
    return rec, draft


@pytest.mark.parametrize("fbs", [1, 3])
def test_a_guess_is_thrown_away_after_a_rejection(fbs):
    """With a draft that is often rejected, every window the verify sees is the one the draft
    drafts afresh from the row's real sequence: a guess made for a window that was not accepted
    whole (or whose next token the draft did not guess) never reaches the verify."""
    seq, _ = windows(DRAFT, False, fbs)
    ovl, _ = windows(DRAFT, True, fbs)
    prop = ovl.inner
    assert prop.misses > 0 and prop.discarded > 0
    assert ovl.windows == seq.windows


def test_a_guess_is_used_when_all_was_accepted_and_drafted_during_the_verify():
    """Draft == target: every window is accepted and every next token guessed, so after each
    prompt's first window the draft forwards all run in the background, during the verify."""
    import threading

    threads = []
    seq, _ = windows(TARGET, False, 2)
    ovl, draft = windows(TARGET, True, 2)
    prop = ovl.inner
    assert prop.misses == 0 and prop.hits > 0
    assert ovl.windows == seq.windows
    main = threading.current_thread().name
    orig = draft.run

    def run(inputs):
        threads.append(threading.current_thread().name)
        return orig(inputs)

    draft.run = run
    prop.draft.session = draft
    threads.clear()
    SpDEngine("draft", TorchSession(TARGET, 2, 128), None,
              SpDSettings(num_speculative_tokens=3, prefill_seq_len=8, ctx_len=128, max_new_tokens=MAX_NEW,
                          full_batch_size=2, adaptive_k=False), proposer=prop, eos_token_ids=[EOS]).generate(PROMPTS[:2])
    background = sum(t != main for t in threads)
    assert background > 0 and background > 2 * (len(threads) - background)


def test_timed_devices_run_at_once():
    def timed(ms):
        return lambda s: TimedSession(s, ms / 1000)

    results = {}
    for overlap in (False, True):
        s = SpDSettings(num_speculative_tokens=3, prefill_seq_len=8, ctx_len=128, max_new_tokens=MAX_NEW,
                        full_batch_size=1, adaptive_k=False, overlap_draft=overlap)
        engine = SpDEngine("draft", TimedSession(TorchSession(TARGET, 1, 128), 0.03), None, s,
                           draft=TimedSession(TorchSession(TARGET, 1, 128), 0.005), eos_token_ids=[EOS])
        t0 = time.perf_counter()
        info = engine.generate(PROMPTS[:3])
        results[overlap] = (time.perf_counter() - t0, [x.tolist() for x in info.generated_ids])
    assert results[True][1] == results[False][1] == REFERENCE[:3]
    assert results[True][0] < 0.9 * results[False][0]  # the windows' 3 draft calls hide behind the verify
