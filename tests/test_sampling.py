"""Speculative sampling keeps the target's (warped) distribution exactly, in every mode, with k
fixed and adaptive; point-mass proposals (pld, multiproj) emit the target-only sampled text token
for token (coupled verification, engine/sampling.py)."""

import copy
import itertools

import numpy as np
import pytest
import torch
from sampling_world import TARGET, chi2_pvalue, exact_distribution, run_engine
from scipy.stats import chisquare
from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from spd_cluster.engine import StepCost
from spd_cluster.engine.sampling import Streams, row_rng, speculative_sample, verify_row, warp



def hf_warp(logits, temperature, top_k, top_p):
    scores = torch.tensor(logits, dtype=torch.float32)[None]
    for w in (TemperatureLogitsWarper(temperature), TopKLogitsWarper(top_k) if top_k else None,
              TopPLogitsWarper(top_p) if top_p < 1 else None):
        if w is not None:
            scores = w(None, scores)
    return torch.softmax(scores.double(), -1)[0].numpy()


@pytest.mark.parametrize("temperature, top_k, top_p", [(0.7, 0, 1.0), (1.3, 5, 1.0), (1.0, 0, 0.8), (0.9, 6, 0.7)])
def test_warp_matches_hf_logits_processors(temperature, top_k, top_p):
    logits = np.random.default_rng(0).normal(size=(4, 50)) * 2
    for row in logits:
        np.testing.assert_allclose(warp(row, temperature, top_k, top_p), hf_warp(row, temperature, top_k, top_p),
                                   atol=1e-6)


def test_verifier_output_follows_p_even_when_q_is_far_from_it():
    """Catches the classic mistakes: sampling the correction from p instead of max(0, p - q), or
    accepting with q/p. The first token out is distributed as p whatever q is."""
    p = np.array([[0.5, 0.3, 0.15, 0.05], [0.25, 0.25, 0.25, 0.25]])
    q = np.array([0.05, 0.15, 0.2, 0.6])
    rng = np.random.default_rng(1)
    n = 20000
    first = np.zeros(4)
    for _ in range(n):
        x = int(np.searchsorted(np.cumsum(q), rng.random()))
        acc, tok = speculative_sample(p, np.array([x]), q[None], rng)
        first[x if acc == 1 else tok] += 1
    assert chisquare(first, p[0] * n).pvalue > 0.01
    # with a point-mass proposal (prompt lookup, heads) too
    first[:] = 0
    for _ in range(n):
        acc, tok = speculative_sample(p, np.array([3]), None, rng)
        first[3 if acc == 1 else tok] += 1
    assert chisquare(first, p[0] * n).pvalue > 0.01


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["baseline", "draft", "pld", "multiproj"])
def test_speculative_sampling_matches_the_target_distribution(mode):
    temperature, top_k, top_p, n_tokens = 0.9, 6, 1.0, 3
    probs = exact_distribution(n_tokens, temperature, top_k, top_p)
    info = run_engine(mode, 2000, n_tokens, 16, temperature=temperature, top_k=top_k, top_p=top_p, seed=5)
    counts = {}
    for ids in info.generated_ids:
        counts[tuple(ids.tolist())] = counts.get(tuple(ids.tolist()), 0) + 1
    assert chi2_pvalue(counts, probs) > 0.01
    if mode != "baseline":  # speculation really happened, and some proposals were rejected
        m = info.perf_metrics
        assert m.proposed_per_position[0] > 0 and 0 < m.accepted_per_position[0] < m.proposed_per_position[0]


@pytest.mark.slow
def test_top_p_draft_mode_distribution():
    probs = exact_distribution(2, 1.4, 0, 0.85)
    info = run_engine("draft", 2000, 2, 16, temperature=1.4, top_p=0.85, seed=9)
    counts = {}
    for ids in info.generated_ids:
        counts[tuple(ids.tolist())] = counts.get(tuple(ids.tolist()), 0) + 1
    assert chi2_pvalue(counts, probs) > 0.01


@pytest.mark.parametrize("mode", ["draft", "pld", "multiproj"])
def test_same_seed_and_prompt_id_same_text_whatever_the_batch(mode):
    """pld and multiproj with adaptive k too (their text is target-only's); a sampling draft with
    k fixed (with adaptive k its corrections fall where the chosen widths put them)."""
    fixed = {"adaptive_k": False} if mode == "draft" else {}
    a = run_engine(mode, 6, 8, 1, temperature=1.0, seed=3, **fixed)
    b = run_engine(mode, 6, 8, 4, temperature=1.0, seed=3, **fixed)
    assert [x.tolist() for x in a.generated_ids] == [x.tolist() for x in b.generated_ids]
    c = run_engine(mode, 6, 8, 4, temperature=1.0, seed=4, **fixed)
    assert [x.tolist() for x in c.generated_ids] != [x.tolist() for x in a.generated_ids]


@pytest.mark.parametrize("fbs", [1, 4])
def test_point_mass_proposals_sample_the_target_only_text_token_for_token(fbs):
    """pld and multiproj, k 1 or 3, fixed or adaptive: each proposal is accepted iff the target's
    own draw at its position is that token, so the sampled text is the baseline's, token for
    token, whatever k and widths (and proposals were accepted and rejected on the way)."""
    kw = dict(temperature=0.9, top_k=6, seed=11)
    base = [x.tolist() for x in run_engine("baseline", 10, 12, fbs, **kw).generated_ids]
    for mode in ("pld", "multiproj"):
        accepted = proposed = 0
        for k, adaptive in itertools.product((1, 3), (False, True)):
            info = run_engine(mode, 10, 12, fbs, k=k, adaptive_k=adaptive, **kw)
            assert [x.tolist() for x in info.generated_ids] == base, (mode, k, adaptive)
            accepted += sum(info.perf_metrics.accepted_per_position)
            proposed += sum(info.perf_metrics.proposed_per_position)
        assert 0 < accepted < proposed, mode


def test_coupled_verification_accepts_with_probability_p_and_rejects_to_p_without_x():
    """verify_row on a point mass: accepted with probability p(x); a rejection emits a sample of
    p with x removed; the first token out follows p. A sampling draft's q: the first token out
    follows p too (rejection sampling on the per-position draws)."""
    p = np.array([[0.5, 0.3, 0.15, 0.05], [0.25, 0.25, 0.25, 0.25]])
    q = np.array([0.05, 0.15, 0.2, 0.6])
    n = 20000
    first, accepted = np.zeros(4), 0
    for i in range(n):
        acc, tok = verify_row(p, np.array([1]), None, Streams(0, i), start=5)
        accepted += acc
        first[1 if acc else tok] += 1
    assert chisquare(first, p[0] * n).pvalue > 0.01 and abs(accepted / n - 0.3) < 0.015
    first[:] = 0
    draws = np.random.default_rng(2)
    for i in range(n):
        x = int(np.searchsorted(np.cumsum(q), draws.random()))
        acc, tok = verify_row(p, np.array([x]), q[None], Streams(1, i), start=5)
        first[x if acc else tok] += 1
    assert chisquare(first, p[0] * n).pvalue > 0.01
    s = Streams(3, "a")
    assert s.uniform("target", 7) == Streams(3, "a").uniform("target", 7) != s.uniform("target", 8)


def widths_seen(monkeypatch) -> list[int]:
    """The proposal count of every row of every sampled verify the engine runs from now on."""
    import spd_cluster.engine.engine as engine_module

    seen, verify = [], engine_module.verify_sampled

    def spy(logits, proposals, counts, *rest):
        seen.extend(np.asarray(counts).tolist())
        return verify(logits, proposals, counts, *rest)

    monkeypatch.setattr(engine_module, "verify_sampled", spy)
    return seen


@pytest.mark.slow
def test_adaptive_width_keeps_the_sampled_distribution(monkeypatch):
    """A sampling draft with adaptive k, on a modelled cost at which the widths it chooses vary
    with what it has learned (a draft close to the target: the target's weights, perturbed): the
    sequences still follow the target's distribution exactly."""
    temperature, top_k, n_tokens, n = 0.9, 3, 4, 2000
    probs = exact_distribution(n_tokens, temperature, top_k, 1.0)
    near = copy.deepcopy(TARGET)
    torch.manual_seed(5)
    with torch.no_grad():
        for p in near.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    seen = widths_seen(monkeypatch)
    cost = StepCost([1.0, 1.02, 1.04, 1.06], draft_s=0.03)
    info = run_engine("draft", n, n_tokens, 16, step_cost=cost, draft=near, temperature=temperature, top_k=top_k,
                      seed=6)
    counts = {}
    for ids in info.generated_ids:
        counts[tuple(ids.tolist())] = counts.get(tuple(ids.tolist()), 0) + 1
    assert chi2_pvalue(counts, probs) > 0.01
    hist = np.bincount(seen, minlength=3)
    hist[0] -= n  # the prefills' verifies propose nothing
    assert min(hist[:3]) > 0.05 * hist.sum(), hist  # plain steps, one proposal and two, all often
    m = info.perf_metrics
    assert 0 < sum(m.accepted_per_position) < sum(m.proposed_per_position)


def test_adaptive_k_runs_when_sampling():
    """Adaptive k when sampling, from the rejection sampler's outcomes: a draft forward as dear as
    a verify is only probed (k fixed proposes every step); a draft that is the target itself (every
    sample accepted) at a tenth of a verify proposes nearly all it may."""
    kw = dict(temperature=1.0, seed=2)
    dear = StepCost([1.0, 1.05, 1.1, 1.15], draft_s=1.0)
    fixed = run_engine("draft", 16, 16, 4, step_cost=dear, adaptive_k=False, **kw).perf_metrics
    adaptive = run_engine("draft", 16, 16, 4, step_cost=dear, **kw).perf_metrics
    assert 0 < sum(adaptive.proposed_per_position) < 0.25 * sum(fixed.proposed_per_position)
    cheap = StepCost([1.0, 1.05, 1.1, 1.15], draft_s=0.1)
    same = run_engine("draft", 16, 16, 4, step_cost=cheap, draft=TARGET, **kw).perf_metrics
    assert same.accepted_per_position == same.proposed_per_position
    assert sum(same.proposed_per_position) >= 0.8 * sum(fixed.proposed_per_position)


def test_row_streams_depend_on_seed_and_prompt_id_only():
    assert row_rng(1, "a").random() == row_rng(1, "a").random()
    assert len({row_rng(s, i).random() for s, i in itertools.product((1, 2), ("a", "b"))}) == 4
