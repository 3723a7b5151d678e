"""Speculative sampling keeps the target's (warped) distribution exactly, in every mode."""

import itertools

import numpy as np
import pytest
import torch
from scipy.stats import chisquare
from tiny import tiny_model
from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from spd_cluster.engine import SpDEngine, SpDSettings
from spd_cluster.engine.sampling import row_rng, speculative_sample, warp
from spd_cluster.sessions.heads import TurboHeads
from spd_cluster.sessions.torch_session import TorchSession

V = 12
TARGET = tiny_model("llama", seed=21, vocab=V)
DRAFT = tiny_model("llama", seed=22, vocab=V, layers=1)
for m in (TARGET, DRAFT):  # soften the sharpened fixture logits: every token keeps real mass
    with torch.no_grad():
        m.lm_head.weight.mul_(0.15)
PROMPT = [5, 9, 2, 7, 0, 11, 1, 8, 3, 10, 4, 6, 5, 9, 2]  # every token once, then a repeat: lookup always proposes


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


def exact_distribution(n_tokens, temperature, top_k, top_p):
    """P(t1..tn | PROMPT) under the warped target, by enumeration."""
    probs = {}

    def walk(prefix, mass):
        if len(prefix) == n_tokens:
            probs[tuple(prefix)] = mass
            return
        with torch.no_grad():
            logits = TARGET(torch.tensor([PROMPT + prefix])).logits[0, -1].numpy()
        p = warp(logits, temperature, top_k, top_p)
        for t in np.flatnonzero(p > 0):
            walk(prefix + [int(t)], mass * p[t])

    walk([], 1.0)
    return probs


def chi2_pvalue(samples, probs):
    keys = sorted(probs)
    observed = np.array([samples.get(k, 0) for k in keys], dtype=float)
    expected = np.array([probs[k] for k in keys]) * sum(samples.values())
    assert sum(samples.get(k, 0) for k in samples if k not in probs) == 0, "a sequence the target cannot produce"
    small = expected < 5  # pool sparse cells, as chi-square needs
    if small.any():
        observed = np.append(observed[~small], observed[small].sum())
        expected = np.append(expected[~small], expected[small].sum())
    return chisquare(observed, expected).pvalue


def run_engine(mode, n_prompts, n_tokens, fbs, **sampling):
    settings = SpDSettings(num_speculative_tokens=3, prefill_seq_len=8, ctx_len=32, max_new_tokens=n_tokens,
                           full_batch_size=fbs, ignore_eos=True, **sampling)
    heads = None
    if mode == "multiproj":
        torch.manual_seed(0)
        heads = TurboHeads(TARGET.config.hidden_size, 3, 1)
        for p in heads.parameters():
            torch.nn.init.normal_(p, std=0.5)
    eng = SpDEngine(mode, TorchSession(TARGET, fbs, 32, heads=heads), None, settings,
                    draft=TorchSession(DRAFT, fbs, 32) if mode == "draft" else None)
    return eng.generate([PROMPT] * n_prompts, prompt_ids=list(range(n_prompts)))


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
    a = run_engine(mode, 6, 8, 1, temperature=1.0, seed=3)
    b = run_engine(mode, 6, 8, 4, temperature=1.0, seed=3)
    assert [x.tolist() for x in a.generated_ids] == [x.tolist() for x in b.generated_ids]
    c = run_engine(mode, 6, 8, 4, temperature=1.0, seed=4)
    assert [x.tolist() for x in c.generated_ids] != [x.tolist() for x in a.generated_ids]


def test_row_streams_depend_on_seed_and_prompt_id_only():
    assert row_rng(1, "a").random() == row_rng(1, "a").random()
    assert len({row_rng(s, i).random() for s, i in itertools.product((1, 2), ("a", "b"))}) == 4
