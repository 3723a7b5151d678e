"""What a suffix index proposes (``Draft``), shared by engine/suffix.py's SuffixIndex and
engine/suffix_native.py's compiled one."""

from __future__ import annotations

from typing import Optional


class Draft:
    """One index's proposal: tokens, their probabilities, the match length that made it."""

    __slots__ = ("tokens", "probs", "score", "match_len")

    def __init__(self, tokens=(), probs=(), match_len: int = 0, score: Optional[float] = None):
        self.tokens, self.probs, self.match_len = tokens, probs, match_len  # lists (draft builds them)
        self.score = float(sum(probs)) if score is None else score


NO_DRAFT = Draft([], [])
