"""The driver's progress bar (tqdm): one tick per prompt, with tokens, tokens/s, acceptance (tokens
per speculative step) and the ETA tqdm derives from the prompt rate since this run started
(smoothing 0: an average, not the last burst). Cheap on the driver: a few additions per result
and a postfix string tqdm redraws at most every 0.5 s (every 10 s into a log file).

Results reach the driver a shard at a time (an actor runs a shard as one call); in between the
driver asks each busy pair what its shard has finished so far (``live``), so the bar moves prompt
by prompt, and the shard's result then takes the place of those counts (``settle``).

Its tok/s is a live rate: this run's generated tokens (finished shards and the running shards'
prompts so far) / seconds since its first dispatch (engine/reduce.py's ``throughput``). The job's
own figure, e2e_throughput over the job wall time less the audit, is the one the summary prints
when the job ends, and `status` and the report show.
"""

from __future__ import annotations

import sys
import time
from typing import Optional

from ..engine.reduce import throughput


class Progress:
    def __init__(self, name: str, total: int, records: dict, enabled: bool):
        from tqdm import tqdm

        self.t0: Optional[float] = None  # the first dispatch of this run
        self.prompts_run = self.tokens_run = 0
        self.errors = sum(r["num_errors"] for r in records.values())
        self.first_error: Optional[str] = None
        self.steps = sum(r.get("num_row_steps", 0) for r in records.values())
        self.accepted = sum(r.get("mean_num_accepted_tokens", 0.0) * r.get("num_row_steps", 0) for r in records.values())
        done = sum(r["num_prompts"] for r in records.values())
        tty = sys.stderr.isatty()  # in a log file (ray job logs) one line per ~10 s, not a redraw per prompt
        self.partial: dict[int, tuple[int, int, int, float]] = {}  # pair -> prompts, tokens, steps, accepted
        self.bar = tqdm(total=total, initial=done, unit="prompt", desc=name, file=sys.stderr, disable=not enabled,
                        mininterval=0.5 if tty else 10.0, dynamic_ncols=tty, smoothing=0)
        self._postfix()

    def started(self) -> None:
        if self.t0 is None:
            self.t0 = time.perf_counter()

    def shard(self, rec: dict) -> None:
        """A shard's record (its counts: prompts, errors, tokens, speculative steps and the
        tokens those steps emitted) has come in."""
        n = int(rec["num_prompts"])
        self.errors += int(rec["num_errors"])
        self.first_error = self.first_error or rec.get("first_error")
        self.tokens_run += int(rec.get("num_generated_tokens") or 0)
        self.prompts_run += n
        self.steps += int(rec.get("num_row_steps") or 0)
        self.accepted += float(rec.get("num_accepted_tokens") or 0)
        self._postfix()
        self.bar.update(n)

    def live(self, pair_id: int, prompts: int, tokens: int, steps: int, accepted_tokens: float) -> None:
        """What ``pair_id``'s running shard has finished so far (counts since the shard began)."""
        before = self.partial.get(pair_id, (0, 0, 0, 0.0))
        self.partial[pair_id] = (prompts, tokens, steps, accepted_tokens)
        self._postfix()
        self.bar.update(prompts - before[0])

    def settle(self, pair_id: int) -> None:
        """``pair_id``'s shard ended (its rows follow through ``prompts``, or it will run again):
        its live counts leave the bar."""
        before = self.partial.pop(pair_id, None)
        if before is not None and before[0]:
            self.bar.update(-before[0])

    def _postfix(self) -> None:
        elapsed = time.perf_counter() - self.t0 if self.t0 else 0.0
        part = [sum(x) for x in zip(*self.partial.values())] or [0, 0, 0, 0.0]
        tokens, steps, accepted = self.tokens_run + part[1], self.steps + part[2], self.accepted + part[3]
        rate = throughput(tokens, elapsed)
        acc = accepted / steps if steps else 0.0
        self.bar.set_postfix_str(f"{tokens:,} tok, {rate:.1f} tok/s, acc {acc:.2f}, errors {self.errors}",
                                 refresh=False)

    def close(self) -> None:
        self.bar.close()
