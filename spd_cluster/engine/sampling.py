"""Speculative sampling that keeps the target's distribution exactly.

One warp for target and draft alike (temperature, then top-k, then top-p: HF `generate`'s order),
one acceptance rule (Leviathan et al. 2023; Chen et al. 2023): accept proposal x with probability
min(1, p(x) / q(x)); at the first rejection sample from normalize(max(0, p - q)); when every
proposal is accepted sample the bonus token from p. Deterministic proposers (prompt lookup,
projection heads) have q = a point mass on x: accept with probability p(x), else sample from p
with x removed.

Randomness is per prompt and per position (``Streams``: keyed by the job seed and the prompt id,
never by the slot, batch, pair or step a prompt lands in). The token at position t is drawn with
the uniform ``("target", t)`` by inverse CDF, whatever mode. For a point-mass proposal x the
verifier draws that very token and accepts x iff it is x (``verify_row``): accepted with
probability p(x), otherwise a sample of p without x, the rule above, coupled so that baseline,
pld and multiproj emit the same sampled text token for token, whatever k or width a step used.
A sampled draft (q a distribution) keeps rejection sampling, with the uniforms ``("accept", t)``
and ``("residual", t)``: each position is decided once, so each draw is used once.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch


def row_rng(seed: int, prompt_id, stream: str = "target") -> np.random.Generator:
    """A sequential stream of one prompt (the sampling draft's own draws)."""
    digest = hashlib.sha256(f"{seed}\x00{prompt_id!r}\x00{stream}".encode()).digest()
    return np.random.Generator(np.random.Philox(key=int.from_bytes(digest[:16], "little")))


class Streams:
    """One prompt's uniforms, each keyed by (kind, position): the same draw whatever batch, step
    or proposal width reaches that position."""

    def __init__(self, seed: int, prompt_id):
        self.key = hashlib.sha256(f"{seed}\x00{prompt_id!r}\x00positions".encode()).digest()

    def uniform(self, kind: str, position: int) -> float:
        h = hashlib.blake2b(f"{kind}\x00{position}".encode(), key=self.key, digest_size=8).digest()
        return (int.from_bytes(h, "little") >> 11) * 2.0 ** -53  # 53 bits: [0, 1)


def warp(logits: np.ndarray, temperature: float, top_k: int = 0, top_p: float = 1.0) -> np.ndarray:
    """Probabilities [..., V] (float64) from logits [..., V]: temperature, then top-k (ties with
    the k-th value kept), then top-p (the smallest set of most likely tokens whose mass reaches
    top_p; at least one token)."""
    if temperature <= 0:
        raise ValueError("warp needs temperature > 0; temperature 0 is greedy")
    x = torch.from_numpy(np.asarray(logits, dtype=np.float32)).double() / temperature
    if top_k and top_k < x.shape[-1]:
        kth = torch.topk(x, top_k, dim=-1).values[..., -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    probs = torch.softmax(x, dim=-1)
    if top_p < 1.0:
        sorted_p, order = torch.sort(probs, dim=-1, descending=True)
        mass_before = sorted_p.cumsum(-1) - sorted_p
        drop_sorted = mass_before >= top_p  # keep tokens until the kept mass reaches top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        probs = probs.masked_fill(drop, 0.0)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs.numpy()


def sample(probs: np.ndarray, rng: np.random.Generator) -> int:
    """One token from a probability vector, by inverse CDF with one uniform draw."""
    return sample_at(probs, rng.random())


def sample_at(probs: np.ndarray, u: float) -> int:
    """The token whose CDF interval holds ``u`` (in [0, 1)): inverse CDF."""
    cdf = np.cumsum(probs)
    return int(min(np.searchsorted(cdf, u * cdf[-1], side="right"), probs.shape[-1] - 1))


def speculative_sample(p: np.ndarray, proposals: np.ndarray, q: np.ndarray | None,
                       rng: np.random.Generator) -> tuple[int, int]:
    """Accept or reject one row's proposals.

    p          [m + 1, V] warped target probabilities at the verify columns
    proposals  [m] proposed tokens
    q          [m, V] the proposer's warped probabilities, or None for a point mass
    Returns (accepted count n, next token): the row emits proposals[:n] then the token.
    """
    for i, x in enumerate(proposals):
        px = p[i, x]
        qx = q[i, x] if q is not None else 1.0
        if qx > 0 and rng.random() < min(1.0, px / qx):
            continue
        if q is not None:
            residual = np.maximum(p[i] - q[i], 0.0)
        else:
            residual = p[i].copy()
            residual[x] = 0.0
        if residual.sum() <= 0:  # p == q: a rejection cannot happen; guard against rounding
            residual = p[i]
        return i, sample(residual, rng)
    return len(proposals), sample(p[len(proposals)], rng)


def verify_row(p: np.ndarray, proposals: np.ndarray, q: np.ndarray | None, streams: Streams,
               start: int) -> tuple[int, int]:
    """``speculative_sample`` on per-position draws: column i emits position ``start + i``.

    A point-mass proposal (q None) is accepted iff the target's own draw at its position is it
    (probability p(x); on rejection that draw is a sample of p without x): the tokens are those
    target-only sampling draws. A draft's q: accept x with probability min(1, p(x) / q(x)), else
    sample normalize(max(0, p - q)). The token after the accepted ones: the target's own draw."""
    for i, x in enumerate(proposals):
        t = start + i
        if q is None:
            tok = sample_at(p[i], streams.uniform("target", t))
            if tok == x:
                continue
            return i, tok
        qx = q[i, x]
        if qx > 0 and streams.uniform("accept", t) < min(1.0, p[i, x] / qx):
            continue
        residual = np.maximum(p[i] - q[i], 0.0)
        if residual.sum() <= 0:  # p == q: a rejection cannot happen; guard against rounding
            residual = p[i]
        return i, sample_at(residual, streams.uniform("residual", t))
    m = len(proposals)
    return m, sample_at(p[m], streams.uniform("target", start + m))
