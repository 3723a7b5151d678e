"""The draft overlapped with the verify (PEARL / MineDraft's idea), greedy.

``OverlappedDraft`` wraps a ``DraftProposer`` whose session is its own device. Right after it
hands the engine a row's window p, a background thread drafts what follows ``seq + p`` as if all
of p were accepted, while the target verifies p. At the next step a row whose verify accepted all
of p and whose new token is the draft's own next guess c[0] gets c[1:] at once, with no draft
forward; any other row's guess is thrown away and the row is drafted afresh. Proposals only
decide how much one verify can emit, never which tokens, so this is as lossless as the draft.

One worker thread runs every background draft, and the caller waits for it before it uses the
draft session itself, so the session is used by one thread at a time. The wait is short: a
window of draft forwards, started when the verify started. A device session that sleeps or
waits on its card (sessions/timed.py, a CUDA stream, a QAIC run) releases the GIL, so the two
devices really run at once.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Optional

import numpy as np

from .proposers import EMPTY, DraftProposer, Proposal


class OverlappedDraft:
    forwards_per_token = 1

    def __init__(self, draft: DraftProposer):
        self.draft = draft
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="spd-draft-ahead")
        self.pending: Optional[Future] = None
        self.guess: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # slot -> (sequence assumed, what follows it)
        self.hits = self.misses = self.discarded = 0  # rows whose guess was used / thrown away, its tokens

    def _wait(self) -> None:
        if self.pending is not None:
            pending, self.pending = self.pending, None
            pending.result()  # a failed background draft fails the step that needs it

    def start(self, slot, prompt_ids, key=None):
        self._wait()
        self.guess.pop(slot, None)
        self.draft.start(slot, prompt_ids, key)

    def learn(self, slots, verified):
        pass  # the next sequence itself says whether the guess held

    def propose(self, slots, seqs, limits):
        self._wait()
        out = [EMPTY] * len(slots)
        fresh = []
        for i, (slot, seq, lim) in enumerate(zip(slots, seqs, limits)):
            guess = self.guess.pop(slot, None)
            if lim <= 0:
                continue
            seq = np.asarray(seq)
            if guess is not None:
                assumed, follows = guess
                n = assumed.shape[0]
                if (follows.size > 1 and seq.shape[0] == n + 1 and seq[n] == follows[0]
                        and np.array_equal(seq[:n], assumed)):
                    out[i] = follows[1 : 1 + lim]
                    self.hits += 1
                    continue
                self.misses += 1
                self.discarded += int(follows.size)
            fresh.append(i)
        catch_up = 0
        if fresh:
            got = self.draft.propose([slots[i] for i in fresh], [seqs[i] for i in fresh], [limits[i] for i in fresh])
            catch_up = got.catch_up
            for i, tokens in zip(fresh, got.tokens):
                out[i] = tokens
        ahead = [i for i, lim in enumerate(limits) if lim > 0 and out[i].size]
        if ahead:  # while the target verifies: what follows each window, if all of it is accepted
            assumed = [np.concatenate([np.asarray(seqs[i], dtype=np.int64), out[i]]) for i in ahead]
            self.pending = self.worker.submit(self._ahead, [slots[i] for i in ahead], assumed,
                                              [int(limits[i]) + 1 for i in ahead])
        return Proposal(out, catch_up=catch_up)

    def _ahead(self, slots, assumed, limits) -> None:
        got = self.draft.propose(slots, assumed, limits)
        for slot, seq, tokens in zip(slots, assumed, got.tokens):
            self.guess[slot] = (seq, tokens)
