"""What the sampling tests share (not fixtures: those are in conftest.py): a tiny target and
draft with softened logits over a 12-token vocabulary, a prompt that lookup always matches, the
exact warped distribution of short continuations, a chi-square check and an engine runner."""

import numpy as np
import torch
from scipy.stats import chisquare
from tiny import tiny_model

from spd_cluster.engine import SpDEngine, SpDSettings
from spd_cluster.engine.sampling import warp
from spd_cluster.sessions.heads import TurboHeads
from spd_cluster.sessions.torch_session import TorchSession

V = 12
TARGET = tiny_model("llama", seed=21, vocab=V)
DRAFT = tiny_model("llama", seed=22, vocab=V, layers=1)
for m in (TARGET, DRAFT):  # soften the sharpened fixture logits: every token keeps real mass
    with torch.no_grad():
        m.lm_head.weight.mul_(0.15)
PROMPT = [5, 9, 2, 7, 0, 11, 1, 8, 3, 10, 4, 6, 5, 9, 2]  # every token once, then a repeat: lookup always proposes


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


def run_engine(mode, n_prompts, n_tokens, fbs, step_cost=None, k=3, draft=None, **sampling):
    settings = SpDSettings(num_speculative_tokens=k, prefill_seq_len=8, ctx_len=32, max_new_tokens=n_tokens,
                           full_batch_size=fbs, ignore_eos=True, **sampling)
    heads = None
    if mode == "multiproj":
        torch.manual_seed(0)
        heads = TurboHeads(TARGET.config.hidden_size, 3, 1)
        for p in heads.parameters():
            torch.nn.init.normal_(p, std=0.5)
    eng = SpDEngine(mode, TorchSession(TARGET, fbs, 32, heads=heads), None, settings,
                    draft=TorchSession(draft or DRAFT, fbs, 32) if mode == "draft" else None, step_cost=step_cost)
    return eng.generate([PROMPT] * n_prompts, prompt_ids=list(range(n_prompts)))
