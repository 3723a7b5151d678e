"""Proposers: where the k speculative tokens of a step come from.

One interface for every mode (``Proposer``). The engine owns each row's token sequence (prompt +
generated); a proposer sees it read-only and returns a ``Proposal`` of up to ``limits[i]``
tokens per row. What the verify found comes back through one hook, ``learn`` (the heads'
guesses for multiproj). A proposer that keeps a KV cache (the draft model) works out for itself
how much of what it fed is still valid by comparing with the sequence it is shown, so the same
object works in-process and behind a Ray actor (one round trip per step).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional, Protocol, Sequence

import numpy as np

from ..sessions.base import DeviceSession, SessionCall, prefill_chunks
from .sampling import row_rng, sample, warp
from .verifier import Verified, top_prob

EMPTY = np.zeros(0, dtype=np.int64)


@dataclass
class Proposal:
    """What a proposer offers for one step: per row, the tokens that should follow its sequence,
    and, only where the proposer sampled them, the distributions [m, V] it sampled them from (what
    speculative sampling needs; None everywhere else: a point mass on each token)."""

    tokens: list[np.ndarray]
    draft_probs: Optional[list[Optional[np.ndarray]]] = None
    # tokens a draft fed in its first forward beyond the one or two of a step that follows a
    # proposing step (a row that proposed nothing for a while catches up): that call's time is
    # no sample of what a draft forward costs
    catch_up: int = 0

    @classmethod
    def empty(cls, rows: int) -> "Proposal":
        return cls([EMPTY] * rows)


def confident_count(probs: np.ndarray, threshold: float) -> int:
    """How many leading proposals to keep: while the product of their probabilities (the
    proposer's estimate that every one of them is accepted) stays >= ``threshold``. A proposal
    past that point would mostly cost a verify row for nothing; fewer rows never change the
    output, only how much of it one step can emit."""
    if threshold <= 0:
        return len(probs)
    return int((np.cumprod(probs) >= threshold).sum())


class Proposer(Protocol):
    """The per-step interface every mode implements, in-process or behind an actor."""

    # draft forwards one proposed token costs (0: the proposer costs only host time); the
    # engine's adaptive k prices a step's proposals with it before asking for them
    forwards_per_token: int

    def start(self, slot: int, prompt_ids: np.ndarray, key=None) -> None:
        """A new prompt takes ``slot`` (called before the target's prefill of it; ``learn`` gets
        that prefill's verify); ``key`` (the prompt id) seeds its random stream."""

    def propose(self, slots: Sequence[int], seqs: Sequence[np.ndarray], limits: Sequence[int]) -> Proposal:
        """For each row, at most ``limits[i]`` tokens that should follow ``seqs[i]``."""

    def learn(self, slots: Sequence[int], verified: Verified) -> None:
        """What the target's verify of these rows found (their prefill included: no proposals)."""

    def finish(self, slot: int, seq: np.ndarray) -> None:
        """The row in ``slot`` finished with ``seq`` (prompt + output); the slot is free after
        it. A no-op but where a proposer learns from finished rows (suffix: the job-wide index);
        the engine calls it only where a proposer has it."""


class NoProposer:
    """Baseline: the target decodes one token per step."""

    forwards_per_token = 0

    def start(self, slot: int, prompt_ids: np.ndarray, key=None) -> None:
        pass

    def propose(self, slots, seqs, limits):
        return Proposal.empty(len(slots))

    def learn(self, slots, verified):
        pass

    def finish(self, slot, seq):
        pass


class NgramIndex:
    """Where each n-gram (1..max_n tokens) of a growing sequence last started, among those that
    end before the sequence's last token: what prompt lookup searches. Each new token adds
    ``max_n`` entries, so a step costs a few dict look-ups, not a scan of the whole row. The
    sequence may only grow between calls (the engine's rows do); a shorter one is re-indexed."""

    def __init__(self, max_n: int):
        self.max_n = max_n
        self.last: dict[tuple, int] = {}
        self.done = 0  # n-grams ending before this position are indexed

    def extend(self, seq: np.ndarray) -> None:
        end = seq.shape[0] - 1  # n-grams ending at the last token stay out: they are the query
        if end < self.done:
            self.last.clear()
            self.done = 0
        if end <= self.done:
            return
        lo = max(0, self.done - self.max_n + 1)
        tail = seq[lo:end].tolist()
        for e in range(self.done, end):  # n-grams ending at e
            for n in range(1, min(self.max_n, e + 1) + 1):
                self.last[tuple(tail[e - lo - n + 1 : e - lo + 1])] = e - n + 1
        self.done = end

    def find(self, seq: np.ndarray, k: int) -> np.ndarray:
        """Up to ``k`` tokens that followed the latest earlier occurrence of the longest suffix
        n-gram of ``seq`` that occurred before; nothing when none did."""
        self.extend(seq)
        n_tokens = seq.shape[0]
        if k <= 0 or n_tokens < 2:
            return EMPTY
        tail = seq[max(0, n_tokens - self.max_n):].tolist()
        for n in range(min(self.max_n, n_tokens - 1), 0, -1):
            start = self.last.get(tuple(tail[len(tail) - n:]))
            if start is not None:
                return seq[start + n : start + n + k].astype(np.int64, copy=True)
        return EMPTY


class PromptLookupProposer:
    """Prompt lookup decoding: find the longest suffix n-gram (max_ngram_size down to 1) that
    occurred earlier in the row's own tokens and propose what followed its most recent earlier
    occurrence. Each slot keeps an NgramIndex of its row, grown with the row; no match proposes
    nothing, so the step costs a one-token decode, not a verify of junk."""

    forwards_per_token = 0

    def __init__(self, max_ngram_size: int = 3):
        if max_ngram_size < 1:
            raise ValueError(f"max_ngram_size must be >= 1, got {max_ngram_size}")
        self.max_ngram_size = max_ngram_size
        self.index: dict[int, NgramIndex] = {}

    def start(self, slot, prompt_ids, key=None):
        self.index[slot] = NgramIndex(self.max_ngram_size)

    def index_of(self, slot: int) -> NgramIndex:
        if slot not in self.index:
            self.index[slot] = NgramIndex(self.max_ngram_size)
        return self.index[slot]

    def propose(self, slots, seqs, limits):
        return Proposal([self.index_of(sl).find(np.asarray(s), lim) for sl, s, lim in zip(slots, seqs, limits)])

    def learn(self, slots, verified):
        pass

    def lookup(self, seq: np.ndarray, k: int) -> np.ndarray:
        """The same search on a sequence of no slot (indexed from scratch)."""
        return NgramIndex(self.max_ngram_size).find(np.asarray(seq), k)


class DraftProposer:
    """A small draft model proposes up to ``limits[i]`` tokens, one draft forward per token.

    Per slot it remembers the tokens it has fed into its KV cache. At each step it keeps the
    longest prefix of those that still agrees with the row's sequence, feeds the rest (one token
    usually; two when all k proposals were accepted last step: the seed's bonus-token case) and
    then runs one-token forwards for the rest. Writes go by position, so rejected tokens need no
    rollback.

    With ``sampling`` (an SpDSettings with temperature > 0) it samples each proposal from its own
    warped distribution q, with a random stream per prompt, and hands q to the verifier in its
    Proposal.

    With ``confidence_threshold`` a row stops proposing (and the draft stops running once every
    row has) when the product of its proposals' draft probabilities falls below it."""

    forwards_per_token = 1

    def __init__(self, session: DeviceSession, prefill_seq_len: int, sampling=None,
                 confidence_threshold: float = 0.0):
        self.session = session
        self.threshold = confidence_threshold
        self.prefill_seq_len = prefill_seq_len
        self.sampling = sampling if sampling is not None and sampling.temperature > 0 else None
        self.fed: dict[int, np.ndarray] = {}
        self.rngs: dict[int, np.random.Generator] = {}

    def learn(self, slots, verified):
        pass  # what it fed that the verify rejected is found by comparing with the next sequence

    def start(self, slot, prompt_ids, key=None):
        if self.sampling is not None:
            self.rngs[slot] = row_rng(self.sampling.seed, key, stream="draft")
        prompt_ids = np.asarray(prompt_ids, dtype=np.int64)
        # Feed all but the last prompt token; propose() feeds the rest with the first token.
        head = prompt_ids[:-1]
        for call in prefill_chunks(head, self.prefill_seq_len, slot):
            self.session.run(replace(call, argmax=True).as_inputs())
        self.fed[slot] = head.copy()

    def _valid_prefix(self, slot: int, seq: np.ndarray) -> int:
        fed = self.fed.get(slot, EMPTY)
        n = min(fed.shape[0], seq.shape[0])
        diff = np.flatnonzero(fed[:n] != seq[:n])
        return int(diff[0]) if diff.size else n

    def propose(self, slots, seqs, limits):
        rows = [i for i, lim in enumerate(limits) if lim > 0]
        out = [EMPTY for _ in slots]
        if not rows:
            return Proposal(out)
        steps = max(limits[i] for i in rows)
        # First forward: the pending tail of each row (1 token, or 2 in the bonus case).
        tails, starts = [], []
        for i in rows:
            seq = np.asarray(seqs[i], dtype=np.int64)
            valid = self._valid_prefix(slots[i], seq)
            valid = min(valid, seq.shape[0] - 1)  # the last token is always fed here
            tails.append(seq[valid:])
            starts.append(valid)
        width = max(t.shape[0] for t in tails)
        catch_up = max(0, width - 2)  # 1 token, or 2 after a whole window was accepted (the bonus)
        ids = np.zeros((len(rows), width), dtype=np.int64)
        pos = np.full((len(rows), width), -1, dtype=np.int64)
        for r, (t, s) in enumerate(zip(tails, starts)):
            ids[r, : t.shape[0]] = t
            pos[r, : t.shape[0]] = np.arange(s, s + t.shape[0])
        batch_index = np.array([[slots[i]] for i in rows], dtype=np.int64)
        row_limits = np.array([min(limits[i], steps) for i in rows])
        proposals = np.zeros((len(rows), steps), dtype=np.int64)
        qs: list[np.ndarray] = []  # per draft forward: [rows, V] (sampling only)
        confidence = np.ones(len(rows))
        last_pos = pos.max(axis=1)
        greedy = self.sampling is None and self.threshold <= 0  # tokens only: the argmax on the device
        for j in range(steps):
            out_j = self.session.run(SessionCall(ids, pos, batch_index, num_logits_to_keep=1,
                                                 argmax=greedy).as_inputs())
            if greedy:
                tok, prob = out_j["tokens"][:, -1].astype(np.int64), None
            elif self.sampling is None:
                logits = out_j["logits"]
                tok = logits[:, -1].argmax(-1).astype(np.int64)
                prob = top_prob(logits[:, -1])
            else:
                logits = out_j["logits"]
                s = self.sampling
                q = warp(logits[:, -1], s.temperature, s.top_k, s.top_p)
                tok = np.array([sample(q[r], self.rngs[slots[i]]) if j < row_limits[r] else 0
                                for r, i in enumerate(rows)], dtype=np.int64)
                qs.append(q)
                prob = q[np.arange(len(rows)), tok] if self.threshold > 0 else None
            proposals[:, j] = tok
            if prob is not None:  # rows no longer confident keep the proposals before this one
                confidence *= prob
                row_limits = np.where(confidence < self.threshold, np.minimum(row_limits, j), row_limits)
            if j + 1 >= row_limits.max():
                break
            # rows that need no more proposals ride along as padding (no KV write)
            last_pos = last_pos + 1
            ids, pos = tok[:, None], np.where(j + 1 < row_limits, last_pos, -1)[:, None]
        probs = [None] * len(slots) if qs else None
        for r, i in enumerate(rows):
            seq = np.asarray(seqs[i], dtype=np.int64)
            n = int(row_limits[r])
            out[i] = proposals[r, :n].copy()
            # KV holds seq plus at least the first n - 1 proposals (the last one was never fed).
            self.fed[slots[i]] = np.concatenate([seq, proposals[r, : max(n - 1, 0)]])
            if qs:
                probs[i] = np.stack([q[r] for q in qs[:n]])
        return Proposal(out, probs, catch_up)


class MultiProjProposer:
    """Turbo/Medusa heads: the target's own verify forward also returns the heads' guesses for
    the tokens after the last one each row emits (``Verified.head_tokens``, through ``learn``);
    the next step proposes those tokens (the leading ones whose probabilities multiply to at
    least ``confidence_threshold``). Costs no forward of its own.

    With ``lookup`` (a PromptLookupProposer) the row's own text is searched too: where the text
    after the latest match of its tail is longer than the heads' confident guesses and starts
    with the same token (or the heads guess nothing), that is proposed instead. Heads see one
    hidden state and fade with depth; code repeats names and lines that a lookup copies whole."""

    forwards_per_token = 0

    def __init__(self, num_heads: int, confidence_threshold: float = 0.0,
                 lookup: PromptLookupProposer | None = None):
        if num_heads < 1:
            raise ValueError("multiproj needs a target session with projection heads (num_heads >= 1)")
        self.num_heads = num_heads
        self.threshold = confidence_threshold
        self.lookup = lookup
        self.next: dict[int, np.ndarray] = {}

    def start(self, slot, prompt_ids, key=None):
        self.next[slot] = EMPTY
        if self.lookup is not None:
            self.lookup.start(slot, prompt_ids, key)

    def learn(self, slots, verified):
        """Keep each row's heads' guesses (``verified.head_tokens`` [B, H]: head h's guess for
        the token h + 1 after the last one the row emitted) for its next step."""
        for i, slot in enumerate(slots):
            tokens = np.asarray(verified.head_tokens[i], dtype=np.int64)
            if self.threshold > 0:
                tokens = tokens[: confident_count(verified.head_probs[i], self.threshold)]
            self.next[slot] = tokens

    def propose(self, slots, seqs, limits):
        out = [self.next.get(s, EMPTY)[:lim] for s, lim in zip(slots, limits)]
        if self.lookup is not None:
            out = [with_lookup(guess, seq, lim, self.lookup.index_of(s))
                   for s, guess, seq, lim in zip(slots, out, seqs, limits)]
        return Proposal(out)


def with_lookup(guess: np.ndarray, seq, limit: int, index: NgramIndex) -> np.ndarray:
    """The heads' ``guess``, or what ``index`` finds after the latest match of ``seq``'s tail when
    that is longer and starts with the same token (or the heads guess nothing)."""
    seq = np.asarray(seq)
    index.extend(seq)  # kept up to date even on steps that do not search
    if len(guess) >= limit:
        return guess
    found = index.find(seq, limit)
    return found if len(found) > len(guess) and (len(guess) == 0 or found[0] == guess[0]) else guess
