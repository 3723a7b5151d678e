"""The one verifier: greedy acceptance, shared by every mode."""

from __future__ import annotations

import numpy as np


def greedy_accept(proposals: np.ndarray, counts: np.ndarray, target_tokens: np.ndarray) -> np.ndarray:
    """Accepted proposals per row.

    proposals      [B, W-1] proposed tokens (row i valid up to counts[i])
    counts         [B] how many tokens row i proposed
    target_tokens  [B, W] target argmax at the verify columns: column j is the target's token after
                   the row's last token and its first j proposals.
    Returns n [B]: the longest prefix with proposal == target token; the row then emits
    target_tokens[i, : n[i] + 1] (the accepted proposals plus the target's own next token).
    """
    width = proposals.shape[1]
    if width == 0:
        return np.zeros(proposals.shape[0], dtype=np.int64)
    match = (proposals == target_tokens[:, :width]) & (np.arange(width)[None, :] < counts[:, None])
    return np.cumprod(match, axis=1).sum(axis=1).astype(np.int64)
