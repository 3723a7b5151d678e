"""A draft's logits over part of the vocabulary: the first ``size`` token ids, plus every id each
slot has been fed (its row's prompt and the tokens since).

A draft proposes; the target decides. So a draft that cannot propose a rare token loses, at
worst, that proposal: the output is the target's either way (greedy: the target's own argmax at
every position; sampled: speculative sampling keeps the target's distribution for any draft
distribution, and this one is zero outside the readout). What it saves is the draft's lm_head
over the rest of the vocabulary, read from memory at every draft forward: on Qwen2.5-Coder-0.5B
the lm_head is a quarter of the weights (151,936 x 896 of ~494M). Ranking the vocabulary by its
ids follows byte-level BPE, which numbers tokens in the order their merges were learned, the
most frequent first (FR-Spec and EAGLE-3 rank a draft's vocabulary by measured frequency; no
corpus ships here). The ids a row has seen keep its own rare tokens (names in code it copies,
words of another script) proposable, which is what copy-heavy rows live on; the ids that end
generation (``always``: special tokens sit at the end of a BPE vocabulary) are in every row's.
"""

from __future__ import annotations

import numpy as np
import torch


def rows_linear(lm_head: torch.nn.Linear, rows) -> torch.nn.Sequential:
    """``lm_head`` over some of its rows (a slice: a view of its weight, no copy; an index tensor:
    those rows gathered) as a linear of its own, inside a Sequential so that the CPU kernels,
    which swap the linears *under* a module, reach it (a bare nn.Linear keeps PyTorch's)."""
    weight = lm_head.weight.detach()[rows]
    lm = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    lm.weight = torch.nn.Parameter(weight, requires_grad=False)
    bias = getattr(lm_head, "bias", None)
    lm.bias = None if bias is None else torch.nn.Parameter(bias.detach()[rows], requires_grad=False)
    return torch.nn.Sequential(lm).eval()


class Readout:
    """The readout of ``lm_head`` (an ``nn.Linear`` over the whole vocabulary) restricted to ids
    ``< size`` plus each slot's fed ids. ``head``: the first ``size`` rows (``rows_linear``)."""

    def __init__(self, lm_head: torch.nn.Linear, size: int, slots: int, always=()):
        vocab = int(lm_head.weight.shape[0])
        if not 0 < size:
            raise ValueError(f"draft_vocab must be a positive number of token ids, got {size}")
        self.size, self.vocab = min(size, vocab), vocab
        self.weight = lm_head.weight  # [V, D]: the rows fed ids above ``size`` are read from
        self.bias = getattr(lm_head, "bias", None)
        self.head = rows_linear(lm_head, slice(0, self.size))
        always = np.unique(np.asarray(list(always), dtype=np.int64))
        self.always = always[(always >= self.size) & (always < vocab)]
        self.ids = [np.zeros(0, dtype=np.int64) for _ in range(slots)]  # per slot, sorted, each >= size
        self.rows: list[torch.Tensor | None] = [None] * slots  # per slot, weight rows of ``ids``
        for slot in range(slots):
            self._start(slot)

    def _start(self, slot: int) -> None:
        self.ids[slot], self.rows[slot] = np.zeros(0, dtype=np.int64), None
        self._add(slot, self.always)

    def _add(self, slot: int, ids: np.ndarray) -> None:
        new = np.setdiff1d(ids[(ids >= self.size) & (ids < self.vocab)], self.ids[slot])
        if new.size:
            self.ids[slot] = np.union1d(self.ids[slot], new)
            self.rows[slot] = self.weight[torch.from_numpy(self.ids[slot]).to(self.weight.device)]

    def feed(self, input_ids: np.ndarray, position_ids: np.ndarray, slots: np.ndarray) -> None:
        """Record what each row of a call writes into its slot; a row that writes position 0
        starts its slot afresh (a new prompt)."""
        for row, slot in enumerate(slots):
            valid = position_ids[row] >= 0
            if not valid.any():
                continue
            slot = int(slot)
            if (position_ids[row][valid] == 0).any():
                self._start(slot)
            self._add(slot, np.unique(input_ids[row][valid]))

    def _extra(self, hidden: torch.Tensor, slot: int) -> torch.Tensor | None:
        """[n, m] logits of one row's ``n`` positions over its slot's fed ids, or None."""
        rows = self.rows[slot]
        if rows is None:
            return None
        out = hidden @ rows.T
        if self.bias is not None:
            out = out + self.bias[torch.from_numpy(self.ids[slot]).to(out.device)]
        return out

    def logits(self, hidden: torch.Tensor, slots: np.ndarray, finish) -> torch.Tensor:
        """[B, n, V] float32 logits, ``-inf`` outside each row's readout. ``finish`` maps raw
        logits to the session's (softcapping, float32)."""
        base = finish(self.head(hidden))
        out = base.new_full((*base.shape[:2], self.vocab), float("-inf"))
        out[..., : self.size] = base
        for row, slot in enumerate(slots):
            extra = self._extra(hidden[row], int(slot))
            if extra is not None:
                out[row, :, torch.from_numpy(self.ids[int(slot)]).to(out.device)] = finish(extra)
        return out

    def argmax(self, hidden: torch.Tensor, slots: np.ndarray, finish) -> np.ndarray:
        """[B, n] ids: each row's argmax over its readout, the lowest id among equals (as an
        argmax over the masked whole vocabulary picks)."""
        base = finish(self.head(hidden))
        best, index = base.max(dim=-1)
        tokens = index.cpu().numpy()
        for row, slot in enumerate(slots):
            extra = self._extra(hidden[row], int(slot))
            if extra is None:
                continue
            e_best, e_index = finish(extra).max(dim=-1)
            wins = (e_best > best[row]).cpu().numpy()  # extras' ids are all above the base's
            tokens[row] = np.where(wins, self.ids[int(slot)][e_index.cpu().numpy()], tokens[row])
        return tokens
