"""A draft session's readout over part of the vocabulary (spd.draft_vocab, sessions/readout.py):
its logits and argmax are the whole vocabulary's restricted to the first ids and the ids each slot
was fed, a new prompt in a slot starts that slot afresh, and a draft pair with it stays lossless."""

import numpy as np
import pytest
from engine_world import EOS, MAX_NEW, PROMPTS, REFERENCE, TARGET, ModelledTime, engine, verifies, verify_cost
from tiny import VOCAB

from spd_cluster.engine import SpDEngine, SpDSettings
from spd_cluster.sessions.base import SessionCall
from spd_cluster.sessions.torch_session import TorchSession

SIZE = 40  # of VOCAB (96): the tiny prompts use ids 3..95, so most of a row's ids are above it


def call(rows, start, logits=True):
    """One call writing ``rows`` (slot -> ids) from position ``start`` (slot -> first position)."""
    width = max(len(ids) for ids in rows.values())
    ids = np.zeros((len(rows), width), dtype=np.int64)
    pos = np.full((len(rows), width), -1, dtype=np.int64)
    for b, (slot, row) in enumerate(rows.items()):
        ids[b, : len(row)] = row
        pos[b, : len(row)] = start[slot] + np.arange(len(row))
    return SessionCall(ids, pos, np.array(list(rows)), num_logits_to_keep=width, argmax=not logits).as_inputs()


def masked(full_logits, allowed):
    out = np.full_like(full_logits, -np.inf)
    out[..., allowed] = full_logits[..., allowed]
    return out


@pytest.mark.parametrize("pack", [False, True], ids=["torch", "cpu-kernels"])
def test_logits_are_the_whole_vocabularys_over_the_first_ids_and_each_slots_fed_ids(pack):
    import copy

    model = copy.deepcopy(TARGET) if pack else TARGET  # packing swaps the linears in place
    full = TorchSession(model, 2, 64, pack=pack)
    part = TorchSession(copy.deepcopy(TARGET) if pack else TARGET, 2, 64, pack=pack, draft_vocab=SIZE)
    rows, pos = {0: PROMPTS[1], 1: PROMPTS[5]}, {0: 0, 1: 0}
    seen = {slot: set() for slot in rows}
    for step in range(6):  # the prompts, then greedy steps fed back one token a row
        want, got = full.run(call(rows, pos))["logits"], part.run(call(rows, pos))["logits"]
        for b, slot in enumerate(rows):
            seen[slot] |= set(rows[slot])
            allowed = sorted(set(range(SIZE)) | {i for i in seen[slot] if i >= SIZE})
            assert len(allowed) > SIZE  # each row's own ids above SIZE are in its readout
            n = len(rows[slot])
            ref = masked(want[b, :n], allowed)
            assert np.array_equal(np.isfinite(got[b, :n]), np.isfinite(ref))
            np.testing.assert_allclose(got[b, :n][np.isfinite(ref)], ref[np.isfinite(ref)], rtol=1e-5, atol=1e-5)
        pos = {slot: pos[slot] + len(rows[slot]) for slot in rows}
        rows = {slot: [int(np.argmax(got[b, len(rows[slot]) - 1]))] for b, slot in enumerate(rows)}


def test_argmax_is_the_masked_argmax_and_a_new_prompt_forgets_the_slots_ids():
    full, part = TorchSession(TARGET, 1, 64), TorchSession(TARGET, 1, 64, draft_vocab=SIZE)
    for prompt in (PROMPTS[5], PROMPTS[1], [3, 4, 5, 6]):
        logits = full.run(call({0: prompt}, {0: 0}))["logits"][0]
        tokens = part.run(call({0: prompt}, {0: 0}, logits=False))["tokens"][0]
        allowed = sorted(set(range(SIZE)) | {i for i in prompt if i >= SIZE})
        assert tokens.tolist() == masked(logits, allowed).argmax(-1).tolist()
    # the last prompt has no id above SIZE: nothing of the earlier prompts is left in the slot
    got = part.run(call({0: [3, 4, 5, 6]}, {0: 0}))["logits"][0]
    assert np.isfinite(got).sum(-1).tolist() == [SIZE] * 4


def test_the_ids_that_end_generation_are_in_every_rows_readout():
    part = TorchSession(TARGET, 1, 64, eos_token_ids=[2, 90], draft_vocab=SIZE)
    for prompt in ([3, 4, 5, 6], [60, 61, 3]):  # a new prompt in the slot keeps them
        finite = np.isfinite(part.run(call({0: prompt}, {0: 0}))["logits"][0, -1])
        assert np.flatnonzero(finite).tolist() == sorted(set(range(SIZE)) | {90} | {i for i in prompt if i >= SIZE})


def test_a_wide_readout_is_the_whole_vocabulary():
    full, part = TorchSession(TARGET, 1, 64), TorchSession(TARGET, 1, 64, draft_vocab=10 * VOCAB)
    np.testing.assert_allclose(part.run(call({0: PROMPTS[2]}, {0: 0}))["logits"],
                               full.run(call({0: PROMPTS[2]}, {0: 0}))["logits"], rtol=1e-5, atol=1e-5)


def draft_run(fbs, adaptive_k, clock, draft_vocab, **kw):
    """Draft mode with the target as its own draft, on a device's modelled costs (a verify 5%
    dearer a token, a draft forward a tenth of a step), so adaptive k does not follow the host."""
    s = SpDSettings(num_speculative_tokens=3, prefill_seq_len=8, ctx_len=128, max_new_tokens=MAX_NEW,
                    full_batch_size=fbs, adaptive_k=adaptive_k, draft_vocab=draft_vocab, **kw)
    target = clock.priced(TorchSession(TARGET, fbs, 128), verify_cost())
    draft = clock.priced(TorchSession(TARGET, fbs, 128, draft_vocab=draft_vocab), 0.1)
    return SpDEngine("draft", target, None, s, draft=draft, eos_token_ids=[EOS]).generate(PROMPTS)


@pytest.mark.parametrize("fbs", [1, 3])
@pytest.mark.parametrize("adaptive_k", [False, True])
def test_a_draft_pair_with_a_readout_is_lossless_and_accepts(fbs, adaptive_k, monkeypatch):
    """The draft is the target itself: with the whole vocabulary every proposal is accepted; with a
    readout the proposals it cannot make (the target's first use of an id above it) are rejected
    part way, and the rest still accepted in runs."""
    clock = ModelledTime(monkeypatch)
    found = verifies(monkeypatch)
    whole = draft_run(fbs, adaptive_k, clock, None)
    whole_found, found[:] = list(found), []
    part = draft_run(fbs, adaptive_k, clock, SIZE)
    assert [ids.tolist() for ids in whole.generated_ids] == REFERENCE
    assert [ids.tolist() for ids in part.generated_ids] == REFERENCE
    assert all(a == p for p, a in whole_found)
    assert any(0 < p and a < p for p, a in found)  # partial accepts
    assert part.perf_metrics.mean_num_accepted_tokens > 1.5  # runs of proposals accepted


def test_a_sampled_draft_with_a_readout_runs_and_its_distributions_live_on_the_readout():
    from spd_cluster.engine.sampling import warp

    part = TorchSession(TARGET, 1, 64, draft_vocab=SIZE)
    q = warp(part.run(call({0: PROMPTS[0]}, {0: 0}))["logits"][0, -1], 0.7)
    outside = [i for i in range(VOCAB) if i >= SIZE and i not in PROMPTS[0]]
    assert q[outside].sum() == 0 and abs(q.sum() - 1) < 1e-9
    info = engine("draft", 3, 2, draft=TARGET, temperature=0.7, draft_vocab=SIZE).generate(PROMPTS)
    assert all(r.error is None for r in info.results)
    assert info.perf_metrics.mean_num_accepted_tokens > 1.0


def test_draft_vocab_is_a_positive_count_and_not_for_a_qaic_draft():
    with pytest.raises(ValueError, match="draft_vocab"):
        SpDSettings(draft_vocab=0)
    from spd_cluster.sessions.loader import load_session

    with pytest.raises(ValueError, match="qaic"):
        load_session("unused", role="draft", device="qaic", full_batch_size=1, ctx_len=64, draft_vocab=100)


def test_a_draft_actor_loads_its_session_with_the_jobs_draft_vocab_and_a_target_without(monkeypatch):
    from spd_cluster import sessions
    from spd_cluster.cluster.actors import DraftActor, TargetActor
    from spd_cluster.config import config_from_dict

    class Loaded(Exception):  # stops each actor's load at its session: what it asked for is all we need
        pass

    seen = {}

    def load_session(model, **kw):
        seen[kw["role"]] = kw
        raise Loaded

    monkeypatch.setattr(sessions, "load_session", load_session)
    monkeypatch.delenv("SPD_CLUSTER_ENGINE", raising=False)
    cfg = config_from_dict({"name": "t", "mode": "draft", "target": {"model": "a"}, "draft": {"model": "b"},
                            "dataset": {"path": "x.jsonl"}, "output": {"path": "out"},
                            "spd": {"draft_vocab": 32768}}, [])
    for cls in (DraftActor, TargetActor):
        actor = cls.__new__(cls)
        actor.device_id = None
        with pytest.raises(Loaded):
            actor._load(cfg, dict(cfg.roles())[cls.role])
    assert seen["draft"]["draft_vocab"] == 32768
    assert "draft_vocab" not in seen["target"]
