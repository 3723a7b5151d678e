"""Suffix decoding (Oliaro et al., SuffixDecoding; vLLM's ``suffix`` method, after Arctic
Inference): proposals from the row's own text and from the outputs the job has already finished.

Two indexes of the same kind (``SuffixIndex``): one per row over its prompt and text so far, and
one per job over the outputs of finished rows (each pair keeps a copy; the Ray layer shares them
between pairs, cluster/suffix_cache.py). Each step, for each index, the proposal is the most
frequent continuation of the longest suffix of the row that occurred there before:

* match: the longest suffix of the row (at most ``max_depth`` tokens) found in the index;
* continue: among the occurrences of that suffix, the most frequent next token, then among those
  that continued so, the most frequent next one, and so on: a chain (the session verifies one
  chain a row; a tree of alternatives would need tree attention in the verify, which the session
  contract does not have). Each token's probability is the running product of its empirical
  frequencies (count of the chosen next token / count of occurrences that continue at all);
  the chain stops before a token whose probability would fall under ``min_prob``, and after
  ``max_spec_factor * match length`` tokens (longer matches earn longer proposals), and ``limit``;
* choose: the proposal with the higher score (the sum of its tokens' probabilities), the row's on
  a tie, as Arctic Inference does.

Index layout: every n-gram of n in KEY_LENS tokens, by the position of its last token, once the
token after it is known (so every indexed occurrence has a continuation). A match is looked up by
its longest key (the last 6, 3, 2 or 1 tokens), then extended backwards over the candidates token by token up to
``max_depth``. Adding a token costs len(KEY_LENS) dict appends (prompt lookup's NgramIndex
sets 3); a look-up reads at most RECENT occurrences of a key (the most recent ones: on a long job
a frequent n-gram's counts are those of its latest RECENT occurrences). Sequences are stored
one after another in one token list, each behind a SEP token, so no match or continuation
crosses from one sequence into another; the job index drops whole sequences, oldest first.

Two implementations of the index, chosen once per process (``native``): engine/suffix_native.py's
C++ one (compiled on first use; the same proposals, for a fraction of the host's time), and
``SuffixIndex`` below, the reference, kept where the extension cannot be built or where
``SPD_SUFFIX_NATIVE=0`` is set.
"""

from __future__ import annotations

import os
from array import array
from typing import Optional, Sequence

import numpy as np

from .proposers import EMPTY, Proposal
from .suffix_draft import NO_DRAFT, Draft  # noqa: F401 - the index's result, both implementations'

KEY_LENS = (1, 2, 3, 6)  # n-grams of these lengths are keys (_keys); a match is extended over its key's candidates
RECENT = 16  # occurrences of one key a look-up reads at most (the most recent)
SEP = -1  # before every stored sequence: no token id, so no match or continuation crosses it
_SHIFT = 21  # bits per token id in an n-gram key (ids of 2**21 and up may share keys: a wasted proposal at worst)
CHUNK = 256  # chain positions reserved ahead of the tokens (SuffixIndex._reserve)

# An n-gram's key, one int, the lengths apart by range (for ids below 2**21): with a the last
# token and b, c, ... those before it, the 1-gram's ~a (negative), the 2-gram's a | b << 21 (below
# 2**42), the 3-gram's k3 = a | b << 21 | (c + 1) << 42 (2**42 and up, below 2**64), the 6-gram's
# k3 | (d | e << 21 | (f + 1) << 42) << 64 (2**106 and up). No tag bits: fewer operations a key.


def _keys(toks: list, e: int) -> tuple:
    """The keys of the n-grams (n in KEY_LENS: 1, 2, 3, 6) that end at ``toks[e]``, shortest
    first, as far as the tokens before it are no SEP (and exist)."""
    a = toks[e]
    if a < 0:
        return ()
    if e < 1 or toks[e - 1] < 0:
        return (~a,)
    k2 = a | toks[e - 1] << _SHIFT
    if e < 2 or toks[e - 2] < 0:
        return (~a, k2)
    k3 = k2 | (toks[e - 2] + 1) << 2 * _SHIFT
    if e < 5 or toks[e - 3] < 0 or toks[e - 4] < 0 or toks[e - 5] < 0:
        return (~a, k2, k3)
    return (~a, k2, k3, k3 | (toks[e - 3] | toks[e - 4] << _SHIFT | (toks[e - 5] + 1) << 2 * _SHIFT) << 64)


_NATIVE = None  # the process's choice (native()): the extension module, or False for the pure-Python index


def native():
    """The compiled index's module where this process uses it, else None: chosen at the first call
    (``SPD_SUFFIX_NATIVE=0`` keeps the pure-Python index; so does an extension that does not build)."""
    global _NATIVE
    if _NATIVE is None:
        _NATIVE = False
        if os.environ.get("SPD_SUFFIX_NATIVE", "1") != "0":
            from . import suffix_native

            _NATIVE = suffix_native.extension() or False
    return _NATIVE or None


def new_index(max_depth: int = 24, max_rows: Optional[int] = None):
    """A SuffixIndex of the process's implementation (``native``)."""
    if native() is None:
        return SuffixIndex(max_depth, max_rows)
    from .suffix_native import NativeSuffixIndex

    return NativeSuffixIndex(max_depth, max_rows, recent=RECENT)



class SuffixIndex:
    """Token sequences, stored one after another, with every n-gram's occurrences (see the module
    docstring). ``add`` stores a whole sequence (a finished row: continuations only from
    ``start`` on, the tokens before it are context a match may reach into); ``open`` and
    ``extend`` store a growing one (a row as it is generated). ``max_rows``: sequences kept at
    most, the oldest dropped first (FIFO); None keeps all.

    Occurrences are chained: ``last[key]`` is the position of the latest one, and ``prev[i]``
    at each position the one before it of the same key length i, so a key costs one dict entry
    and no list (no container the garbage collector walks), and a dropped sequence's positions
    fall out of every chain at once (they are below ``base``)."""

    def __init__(self, max_depth: int = 24, max_rows: Optional[int] = None):
        if max_depth < 1:
            raise ValueError(f"max_depth must be >= 1, got {max_depth}")
        self.max_depth = max_depth
        self.max_rows = max_rows
        self.toks: list[int] = []  # toks[i] is the token at position base + i
        self.prev = [array("q") for _ in KEY_LENS]  # prev[i][j]: the occurrence before the one at base + j
        self.base = 0
        self.last: dict[int, int] = {}  # n-gram key -> position of its latest occurrence's last token
        self.rows: list[tuple[int, int, int]] = []  # (SEP position, first indexed end, end) per sequence
        self.num_tokens = 0  # tokens stored (not counting SEPs)

    def __len__(self) -> int:
        return len(self.rows)

    def num_keys(self) -> int:
        """N-gram keys held (those of dropped sequences go with them)."""
        return len(self.last)

    # -- building ----------------------------------------------------------------------------

    def _append(self, tokens: list) -> None:
        self.toks.extend(tokens)
        self._reserve()

    def _reserve(self) -> None:
        """Chains as long as the tokens at least: they grow ahead, in blocks of CHUNK positions
        (-1 each: no occurrence before), so a row's step extends none of them."""
        short = len(self.toks) - len(self.prev[0])
        if short > 0:
            none = array("q", [-1]) * (short + CHUNK)
            for chain in self.prev:
                chain.extend(none)

    def _index(self, lo: int, hi: int) -> None:
        """Index the n-grams ending at positions lo..hi-1 (each has its next token stored)."""
        # _keys inlined (a token's four keys without a tuple or a call: the host's cost per step);
        # toks[0] is a SEP (the first sequence's, or the oldest kept one's), so a token before a
        # real token exists and no index wraps around
        toks, base, last, get = self.toks, self.base, self.last, self.last.get
        p1, p2, p3, p6 = self.prev
        S, S2 = _SHIFT, 2 * _SHIFT
        for j in range(lo - base, hi - base):
            a = toks[j]
            if a < 0:
                continue
            e = j + base
            k = ~a
            p1[j] = get(k, -1)
            last[k] = e
            b = toks[j - 1]
            if b < 0:
                continue
            k2 = a | b << S
            p2[j] = get(k2, -1)
            last[k2] = e
            c = toks[j - 2]
            if c < 0:
                continue
            k3 = k2 | (c + 1) << S2
            p3[j] = get(k3, -1)
            last[k3] = e
            d = toks[j - 3]
            if d < 0:
                continue
            f = toks[j - 4]
            if f < 0:
                continue
            g = toks[j - 5]
            if g < 0:
                continue
            k = k3 | (d | f << S | (g + 1) << S2) << 64
            p6[j] = get(k, -1)
            last[k] = e

    def add(self, tokens: Sequence[int], start: int = 0) -> None:
        """Store a finished sequence; its tokens from ``start`` on are continuations, those
        before it only context (the end of a prompt, before its output)."""
        self._add(tokens.tolist() if isinstance(tokens, np.ndarray) else [int(t) for t in tokens], start)

    def _add(self, tokens: list, start: int = 0) -> None:
        """``add`` of a list of ints."""
        if len(tokens) <= start:
            return
        sep = self.base + len(self.toks)
        self._append([SEP] + tokens)
        end = sep + 1 + len(tokens)
        first = sep + max(start, 1)  # the first n-gram end whose next token is a continuation
        self._index(first, end - 1)
        self.rows.append((sep, first, end))
        self.num_tokens += len(tokens)
        if self.max_rows is not None:
            while len(self.rows) > self.max_rows:
                self._evict()

    def open(self, tokens: Sequence[int]) -> None:
        """Start the open sequence (a row) with ``tokens``; ``extend`` grows it."""
        self.add(tokens)

    def extend(self, seq: np.ndarray | Sequence[int]) -> None:
        """Grow the last sequence to ``seq`` (which starts with what it holds; the engine's rows
        only grow)."""
        sep, first, end = self.rows[-1]
        have = end - sep - 1
        n = len(seq)
        if n <= have:
            return
        new = seq[have:n]
        self._append(new.tolist() if isinstance(new, np.ndarray) else [int(t) for t in new])
        self._index(end - 1, sep + n)
        self.rows[-1] = (sep, first, sep + 1 + n)
        self.num_tokens += n - have

    def grow(self, seq: np.ndarray | Sequence[int], depth: int) -> list:
        """``extend(seq)``, then ``context(depth)``: a row's step, in one call."""
        sep, first, end = self.rows[-1]
        n = len(seq)
        have = end - sep - 1
        if n > have:
            new = seq[have:n]
            new = new.tolist() if isinstance(new, np.ndarray) else [int(t) for t in new]
            self.toks.extend(new)
            if len(self.toks) > len(self.prev[0]):
                self._reserve()
            self._index(end - 1, sep + n)
            end = sep + 1 + n
            self.rows[-1] = (sep, first, end)
            self.num_tokens += n - have
        return self.toks[max(sep + 1, end - depth) - self.base :]

    def _evict(self) -> None:
        """Drop the oldest sequence: its positions fall below ``base``, out of every chain; keys
        whose latest occurrence was in it go."""
        sep, first, end = self.rows.pop(0)
        toks, base, last = self.toks, self.base, self.last
        new_base = self.rows[0][0] if self.rows else end  # the next sequence's SEP
        for e in range(first, end - 1):
            for key in _keys(toks, e - base):
                if last.get(key, new_base) < new_base:
                    del last[key]
        self.num_tokens -= end - sep - 1
        cut = new_base - base
        del toks[:cut]
        for chain in self.prev:
            del chain[:cut]
        self.base = new_base

    def context(self, depth: int) -> list:
        """The last ``depth`` tokens (at most) of the last sequence."""
        sep, _, end = self.rows[-1]
        return self.toks[max(sep + 1, end - depth) - self.base :]

    def occurrences(self, key_index: int, key: int, most: Optional[int] = None) -> list[int]:
        """The latest ``most`` (RECENT) occurrences of ``key`` (of length KEY_LENS[key_index]),
        oldest first."""
        most = RECENT if most is None else most
        out = []
        p, base, chain = self.last.get(key, -1), self.base, self.prev[key_index]
        while p >= base and len(out) < most:
            out.append(p)
            p = chain[p - base]
        out.reverse()
        return out

    # -- looking up --------------------------------------------------------------------------

    def match(self, ctx: list) -> tuple[list[int], int]:
        """The occurrences (most recent RECENT at most, oldest first) of the longest suffix of
        ``ctx`` that occurred here with a next token, and its length (0: none). ``ctx``: the
        row's last tokens, no SEP among them."""
        cands, n = self._match(ctx)
        return cands[::-1], n

    def _match(self, ctx: list) -> tuple[list[int], int]:
        """``match``, the most recent occurrence first."""
        md = self.max_depth
        if len(ctx) > md:
            ctx = ctx[-md:]
        L = len(ctx)
        last, base = self.last, self.base
        S = _SHIFT
        a = ctx[-1]
        i, p = -1, -1
        # the longest key first (_keys inlined)
        if L >= 2:
            k2 = a | ctx[-2] << S
            if L >= 3:
                k3 = k2 | (ctx[-3] + 1) << 2 * S
                if L >= 6:
                    p = last.get(k3 | (ctx[-4] | ctx[-5] << S | (ctx[-6] + 1) << 2 * S) << 64, -1)
                    if p >= base:
                        i = 3
                if i < 0:
                    p = last.get(k3, -1)
                    if p >= base:
                        i = 2
            if i < 0:
                p = last.get(k2, -1)
                if p >= base:
                    i = 1
        if i < 0:
            p = last.get(~a, -1)
            if p < base:
                return [], 0
            i = 0
        chain = self.prev[i]
        cands = [p]
        for _ in range(RECENT - 1):
            p = chain[p - base]
            if p < base:
                break
            cands.append(p)
        n = KEY_LENS[i]
        # a longer key missed: the match is shorter than it
        depth = L if i == 3 else min(L, KEY_LENS[i + 1] - 1)
        if depth <= n:
            return cands, n
        toks = self.toks
        whole = ctx[L - depth : L - n]  # candidates that match all of it, in one comparison each
        lo, hi = base + depth - 1, base + n - 1
        full = [p for p in cands if toks[p - lo : p - hi] == whole]
        if full:
            return full, depth
        for d in range(n, depth):
            want = ctx[-1 - d]
            keep = [p for p in cands if toks[p - base - d] == want]
            if not keep:
                return cands, d
            cands = keep
        return cands, depth

    def draft(self, ctx: list, limit: int, max_spec_factor: float = 1.0, min_prob: float = 0.1) -> Draft:
        """The most frequent continuation of the longest match of ``ctx`` (module docstring)."""
        if limit <= 0 or not ctx:
            return NO_DRAFT
        cands, n = self._match(ctx)
        if not n:
            return NO_DRAFT
        cap = min(limit, int(max_spec_factor * n + 1e-6))
        toks, base = self.toks, self.base
        if len(cands) == 1:  # one occurrence (a span the row copies, a rare match): its continuation, certain
            p = cands[0] - base + 1
            rest = toks[p : p + cap]
            if SEP in rest:
                rest = rest[: rest.index(SEP)]
            return Draft(rest, [1.0] * len(rest), n, float(len(rest))) if rest else NO_DRAFT
        # the distinct continuations, with how many occurrences have each (the most recent first:
        # it wins a tie); most occurrences of a template or a copied span continue alike
        b1 = base - 1
        conts = [toks[p - b1 : p - b1 + cap] for p in cands]
        c0 = conts[0]
        if conts.count(c0) == len(conts):  # they all continue alike: that continuation, certain
            if SEP in c0:
                c0 = c0[: c0.index(SEP)]
            return Draft(c0, [1.0] * len(c0), n, float(len(c0)))
        if len(c0) < cap:  # (the most recent is cut first) cut by the end of the tokens: as if a SEP followed
            pad = [SEP] * cap
            conts = [c + pad[len(c):] for c in conts]
        # token by token: the most frequent next token among the occurrences that continued as
        # proposed so far (the most recent on a tie: the first seen), its frequency among those
        # that continue at all (no SEP)
        out, probs = [], []
        prob = 1.0
        for j in range(cap):
            col = [c[j] for c in conts]
            total = len(col) - col.count(SEP)
            if not total:
                break
            best, top = SEP, 0
            for t in dict.fromkeys(col):
                if t >= 0:
                    k = col.count(t)
                    if k > top:
                        best, top = t, k
            prob *= top / total
            if prob < min_prob:
                break
            out.append(best)
            probs.append(prob)
            conts = [c for c in conts if c[j] == best]
            if conts.count(conts[0]) == len(conts):  # one continuation left: the rest of it, up to its end
                rest = conts[0][j + 1 :]
                if SEP in rest:
                    rest = rest[: rest.index(SEP)]
                out += rest
                probs += [prob] * len(rest)
                break
        return Draft(out, probs, n)


class SuffixProposer:
    """The ``suffix`` mode's proposer: per row a SuffixIndex over its prompt and text so far,
    and ``job``, a SuffixIndex over the outputs of the rows finished so far (this engine's, and
    those other pairs sent: ``add_rows``). ``finish`` stores a finished row's output in ``job``
    (with the last ``max_depth`` prompt tokens before it, as context only) and keeps it for the
    other pairs (``take_finished``). With ``cache_rows`` 0 there is no job index.

    Counts by source (``take_stats``): row-steps that proposed from the row or from the job,
    tokens proposed (before adaptive k cuts them to the step's width) and tokens accepted."""

    forwards_per_token = 0
    STATS = ("suffix_steps_row", "suffix_steps_job", "suffix_proposed_row", "suffix_proposed_job",
             "suffix_accepted_row", "suffix_accepted_job")

    def __init__(self, max_depth: int = 24, max_spec_factor: float = 1.0, min_prob: float = 0.1,
                 cache_rows: int = 1000):
        self.max_depth, self.factor, self.min_prob = max_depth, max_spec_factor, min_prob
        self.cache_rows = cache_rows
        self.native = native()  # the compiled index's module (None: the pure-Python SuffixIndex)
        self.job = new_index(max_depth, max_rows=cache_rows) if cache_rows > 0 else None
        self.rows: dict[int, SuffixIndex] = {}
        self.prompt_len: dict[int, int] = {}
        self.last: dict[int, str] = {}  # slot -> the stat its last proposal's accepted tokens count in
        self.finished: list[list[int]] = []  # (prompt tail + output, prompt tail length) of rows not yet sent
        self.stats = dict.fromkeys(self.STATS, 0)
        self.cache_seen = 0  # behind Ray: the job cache's serial this engine has pulled up to

    def start(self, slot, prompt_ids, key=None):
        if self.native is not None:
            from .suffix_native import NativeSuffixIndex

            index = NativeSuffixIndex(self.max_depth, recent=RECENT)
            index.ix.add(np.asarray(prompt_ids, dtype=np.int64), 0)
        else:
            index = SuffixIndex(self.max_depth)
            index._add(np.asarray(prompt_ids).tolist())
        self.rows[slot] = index
        self.prompt_len[slot] = len(prompt_ids)
        self.last.pop(slot, None)

    _KEYS = {src: tuple(f"suffix_{what}_{src}" for what in ("steps", "proposed", "accepted")) for src in ("row", "job")}

    _SOURCES = (None, "row", "job")  # the native step's source codes

    def propose(self, slots, seqs, limits):
        if self.native is not None:
            return self._propose_native(slots, seqs, limits)
        out = []
        rows, job, stats, last = self.rows, self.job, self.stats, self.last
        depth, factor, min_prob = self.max_depth, self.factor, self.min_prob
        for slot, seq, limit in zip(slots, seqs, limits):
            index = rows.get(slot)
            if index is None:
                self.start(slot, seq)
                index = rows[slot]
            if limit <= 0:
                index.extend(seq)
                out.append(EMPTY)
                last.pop(slot, None)
                continue
            ctx = index.grow(seq, depth)
            own = index.draft(ctx, limit, factor, min_prob)
            # the job's can at most tie a full, certain proposal of the row's (and a tie is the row's)
            if job is not None and job.rows and own.score < limit:  # (an empty job index has nothing)
                other = job.draft(ctx, limit, factor, min_prob)
                source, best = ("row", own) if own.score >= other.score else ("job", other)
            else:
                source, best = "row", own
            if best.tokens:
                steps, proposed, accepted = self._KEYS[source]
                stats[steps] += 1
                stats[proposed] += len(best.tokens)
                last[slot] = accepted
                out.append(np.array(best.tokens, dtype=np.int64))
            else:
                last.pop(slot, None)
                out.append(EMPTY)
        return Proposal(out)

    def _propose_native(self, slots, seqs, limits):
        """``propose`` on the compiled indexes: a row's step in one call (suffix_native: step)."""
        out = []
        rows, stats, last, step = self.rows, self.stats, self.last, self.native.step
        job = self.job.ix if self.job is not None else None
        depth, factor, min_prob = self.max_depth, self.factor, self.min_prob
        keys, sources = self._KEYS, self._SOURCES
        for slot, seq, limit in zip(slots, seqs, limits):
            index = rows.get(slot)
            if index is None:
                self.start(slot, seq)
                index = rows[slot]
            if limit <= 0:
                index.ix.extend(seq)
                out.append(EMPTY)
                last.pop(slot, None)
                continue
            source, tokens = step(index.ix, job, seq, limit, depth, factor, min_prob)
            if source:
                steps, proposed, accepted = keys[sources[source]]
                stats[steps] += 1
                stats[proposed] += len(tokens)
                last[slot] = accepted
                out.append(tokens)
            else:
                last.pop(slot, None)
                out.append(EMPTY)
        return Proposal(out)

    def learn(self, slots, verified):
        last, stats = self.last, self.stats
        if not last:
            return
        for slot, accepted in zip(slots, np.asarray(verified.accepted).tolist()):
            key = last.pop(slot, None)
            if key is not None:
                stats[key] += accepted

    def finish(self, slot, seq):
        """Row ``slot`` finished with ``seq`` (prompt + output): its output joins the job index."""
        self.rows.pop(slot, None)
        self.last.pop(slot, None)
        n = self.prompt_len.pop(slot, None)
        if self.job is None or n is None or len(seq) <= n:
            return
        tail = min(n, self.max_depth)
        if self.native is not None:
            row = np.asarray(seq[n - tail :], dtype=np.int64)
            self.job.ix.add(row, tail)
            row = row.tolist()
        else:
            row = np.asarray(seq[n - tail :]).tolist()
            self.job._add(row, start=tail)
        self.finished.append([tail] + row)
        del self.finished[: max(0, len(self.finished) - self.cache_rows)]

    # -- the job index across pairs (cluster/suffix_cache.py) --------------------------------

    def take_finished(self) -> list[list[int]]:
        """The rows finished here since the last call, each [prompt tail length, *tokens]."""
        out, self.finished = self.finished, []
        return out

    def add_rows(self, rows: Sequence[Sequence[int]]) -> None:
        """Rows other pairs finished ([prompt tail length, *tokens] each) join the job index."""
        if self.job is None:
            return
        for r in rows:
            self.job.add(r[1:], start=int(r[0]))

    def take_stats(self) -> dict[str, int]:
        """The counts by source since the last call (the engine copies them into a run's metrics)."""
        out, self.stats = self.stats, dict.fromkeys(self.STATS, 0)
        return out
