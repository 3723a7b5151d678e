"""A device session whose every call takes a modelled device time.

``TimedSession(inner, seconds)`` runs ``inner`` and then sleeps until the call has taken
``seconds`` (or ``seconds(inputs)``): what a card's step would cost, whatever the host. Sleeping
releases the GIL, so two timed sessions in two threads run at once even on one core: how the
overlapped draft (engine/overlap.py) is measured without two devices.
"""

from __future__ import annotations

import time


class TimedSession:
    def __init__(self, inner, seconds):
        self.inner = inner
        self.seconds = seconds if callable(seconds) else (lambda inputs: seconds)
        self.full_batch_size, self.ctx_len = inner.full_batch_size, inner.ctx_len
        self.vocab_size, self.num_heads = inner.vocab_size, inner.num_heads
        self.eos_token_ids = list(inner.eos_token_ids)
        self.calls = 0

    def run(self, inputs):
        t0 = time.perf_counter()
        out = self.inner.run(inputs)
        self.calls += 1
        left = self.seconds(inputs) - (time.perf_counter() - t0)
        if left > 0:
            time.sleep(left)
        return out
