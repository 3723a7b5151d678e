"""The one verifier, shared by every mode: what a verify call emits per row.

``Verified`` is what a step hands back to the engine and, through ``Proposer.learn``, to the
proposer: the accepted counts, the tokens each row emits, and where the target session has
projection heads their guesses from that very call.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

# the greedy rules live below the engine, in the session layer (sessions take the argmax too)
from ..sessions.greedy import greedy_accept, greedy_guesses, top_prob  # noqa: F401 - re-exported


@dataclass
class Verified:
    accepted: np.ndarray  # [B] proposals accepted per row
    tokens: np.ndarray  # [B, W] row i emits tokens[i, : accepted[i] + 1]
    head_tokens: Optional[np.ndarray] = None  # [B, H]: head h's guess for the token h + 1 after the last one emitted
    head_probs: Optional[np.ndarray] = None  # [B, H]: its probability

    def rows(self, index) -> "Verified":
        pick = (lambda a: None if a is None else a[index])
        return Verified(self.accepted[index], self.tokens[index], pick(self.head_tokens), pick(self.head_probs))


def verify_greedy(out: dict, proposals: np.ndarray, counts: np.ndarray) -> Verified:
    """A greedy step from a session's ``argmax`` outputs."""
    tokens = out["tokens"]
    return Verified(greedy_accept(proposals, counts, tokens), tokens, out.get("head_tokens"), out.get("head_probs"))


def verify_sampled(logits: np.ndarray, proposals: np.ndarray, counts: np.ndarray,
                   draft_probs: Optional[Sequence[Optional[np.ndarray]]], streams: Sequence, starts: Sequence[int],
                   settings) -> Verified:
    """Speculative sampling per row (engine/sampling.py: ``verify_row``) from a session's logits
    [B, W, V] (or [B, W, H + 1, V] with heads, whose greedy guesses are read at each row's
    accepted column). Row i's column j emits position ``starts[i] + j`` of its sequence, drawn
    from its prompt's ``streams[i]``."""
    from .sampling import verify_row, warp

    base = logits[:, :, 0] if logits.ndim == 4 else logits
    b = base.shape[0]
    accepted = np.zeros(b, dtype=np.int64)
    tokens = np.concatenate([proposals, np.zeros((b, 1), dtype=np.int64)], axis=1)
    for i in range(b):
        m = int(counts[i])
        p = warp(base[i, : m + 1], settings.temperature, settings.top_k, settings.top_p)
        q = draft_probs[i] if draft_probs is not None and m else None
        n, tok = verify_row(p, proposals[i, :m], None if q is None else q[:m], streams[i], int(starts[i]))
        accepted[i] = n
        tokens[i, n] = tok
    heads = greedy_guesses(logits[np.arange(b), accepted, 1:]) if logits.ndim == 4 else (None, None)
    return Verified(accepted, tokens, *heads)
