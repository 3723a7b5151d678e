"""The SpD engine: prompts in, ``CloudAI100ExecInfo`` out, over the device-session contract.

Continuous batching over ``full_batch_size`` slots: a prompt takes a free slot, is prefilled in
``prefill_seq_len`` chunks (that gives its first token), then decodes with the others. Each step
the proposer offers up to m tokens per row (m chosen by adaptive k, engine/adaptive.py), the
target scores ``[last, d1..dm]`` at positions ``p..p+m`` in one forward, and the verifier keeps
the agreeing prefix plus the target's own token; the proposer and the width policy learn what
the verify found. A finished row frees its slot for the next prompt at once. Each ``generate``
(a shard, on an actor) starts the width policy afresh (``WidthPolicy.reset``).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, replace
from time import perf_counter
from typing import Callable, Sequence

import numpy as np

from ..sessions.base import DeviceSession, SessionCall, prefill_chunks
from .adaptive import AdaptiveWidth, FixedWidth, Step, StepCost, WidthPolicy
from .metrics import CloudAI100ExecInfo, PromptResult, SpDPerfMetrics
from .modes import mode as mode_of
from .proposers import Proposal, Proposer
from .sampling import Streams
from .settings import SpDSettings
from .verifier import Verified, verify_greedy, verify_sampled
from .warmup import warm_up


def _no_finish(slot, seq) -> None:
    """A proposer without a ``finish`` hook keeps nothing of finished rows."""


class PromptError(ValueError):
    """A prompt that cannot run; it becomes an error result, the others go on."""


def _token_ids(prompt) -> np.ndarray:
    """A token-id prompt as int64, or PromptError: ints only (no bools, floats, strings, lists)."""
    if isinstance(prompt, np.ndarray):
        if prompt.dtype.kind in "iu":
            return prompt.astype(np.int64).reshape(-1)
        raise PromptError(f"prompt is an array of {prompt.dtype}, not a string or token ids")
    vals = list(prompt)
    if all(isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_)) for x in vals):
        try:
            return np.array(vals, dtype=np.int64)
        except OverflowError:
            raise PromptError("prompt has a token id outside the target's vocabulary (too large for int64)") from None
    kinds = ", ".join(sorted({type(x).__name__ for x in vals}))
    raise PromptError(f"prompt is a list of {kinds}, not a string or a list of token ids")


@dataclass
class _Row:
    result: PromptResult
    slot: int
    buf: np.ndarray  # prompt + generated tokens, preallocated to ctx_len
    n: int  # tokens in buf
    t0: float = 0.0  # prefill start (perf_counter)
    streams: Streams | None = None  # sampling only: this prompt's own draws, by position

    @property
    def seq(self) -> np.ndarray:
        return self.buf[: self.n]


class _Clock:
    def __init__(self):
        self.prefill = self.draft = self.target = 0.0
        self.iterations = self.target_forwards = self.row_steps = self.decode_tokens = 0


class SpDEngine:
    def __init__(
        self,
        mode: str,
        target: DeviceSession,
        tokenizer=None,
        settings: SpDSettings | None = None,
        *,
        draft: DeviceSession | None = None,
        proposer: Proposer | None = None,
        eos_token_ids: Sequence[int] | None = None,
        target_name: str = "",
        draft_name: str = "",
        step_cost: StepCost | None = None,
        warm_up: bool = True,
    ):
        """``step_cost``: the target's step-cost curve for adaptive k, taken as given. When not
        given (settings.adaptive_k, a mode that speculates) it is measured on ``target`` at the
        first ``generate`` (not here: in a pair the draft actor may still be loading) and then
        follows what the job's verifies cost. ``policy`` (engine/adaptive.py) is the width
        policy: ``AdaptiveWidth`` with adaptive k, ``FixedWidth`` (always k) without.
        ``warm_up``: run engine/warmup.py's passes on ``target`` before the first shard (False where every call
        of the session is someone's data: the heads trainer's recording session)."""
        self.spec = spec = mode_of(mode)
        self.mode, self.target, self.tokenizer = mode, target, tokenizer
        self.settings = settings = settings or SpDSettings()
        self.k = spec.max_k(settings)
        self.target_name, self.draft_name = target_name, draft_name
        if target.ctx_len < settings.ctx_len or target.full_batch_size < settings.full_batch_size:
            raise ValueError(
                f"target session has ctx_len={target.ctx_len}, full_batch_size={target.full_batch_size}; "
                f"settings need {settings.ctx_len}, {settings.full_batch_size}"
            )
        self.proposer = proposer if proposer is not None else spec.build(settings, target, draft)
        if spec.uses_heads:
            self.k = min(self.k, target.num_heads)
        self.warm_passes = 0 if warm_up else -1  # warm_up's passes on the target (at the first generate; 0: not yet)
        self.policy: WidthPolicy = FixedWidth()
        if settings.adapts and self.k > 0:
            rows, width, heads = settings.full_batch_size, self.k + 1, spec.uses_heads
            greedy = not settings.sampling  # the curve of the verifies the engine makes (logits when sampling)
            self.policy = AdaptiveWidth(step_cost, lambda: StepCost.measure(target, rows, width, heads=heads,
                                                                            argmax=greedy))
        if eos_token_ids is None and tokenizer is not None and tokenizer.eos_token_id is not None:
            eos_token_ids = [tokenizer.eos_token_id]
        self.eos = np.array(sorted(set(eos_token_ids or [])), dtype=np.int64)

    # -- prompts ---------------------------------------------------------------------------

    def encode(self, prompt) -> np.ndarray:
        """Token ids of one prompt: ``tokenizer(prompt)`` like the seed, or the chat template with
        ``add_generation_prompt=True``. In process, a list (or int array) of token ids is taken
        as already tokenized; every id is checked against the target's vocabulary. Anything that
        cannot run raises PromptError (an error row), never another exception."""
        if isinstance(prompt, (list, tuple, np.ndarray)):
            ids = _token_ids(prompt)
        elif not isinstance(prompt, str):
            raise PromptError(f"prompt is not a string (got {type(prompt).__name__})")
        elif not prompt.strip():
            raise PromptError("prompt is empty or whitespace")
        elif self.tokenizer is None:
            raise PromptError("a text prompt needs a tokenizer")
        else:
            try:
                ids = np.asarray(self._tokenize(prompt), dtype=np.int64).reshape(-1)
            except Exception as e:  # noqa: BLE001 - a tokenizer failing on one prompt fails that row only
                raise PromptError(f"prompt could not be tokenized: {type(e).__name__}: {e}") from None
        if ids.size == 0:
            raise PromptError("prompt has no tokens")
        vocab = int(self.target.vocab_size)
        bad = np.flatnonzero((ids < 0) | (ids >= vocab))
        if bad.size:
            raise PromptError(f"token id {int(ids[bad[0]])} at position {int(bad[0])} is outside the target's "
                              f"vocabulary (0..{vocab - 1}); {bad.size} such id(s)")
        if ids.size >= self.settings.ctx_len:
            raise PromptError(
                f"prompt has {ids.size} tokens; ctx_len={self.settings.ctx_len} leaves no room to generate"
            )
        return ids

    def _tokenize(self, prompt: str):
        if self.settings.chat_template:
            text = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
            )
            return self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return self.tokenizer(prompt)["input_ids"]

    def decode(self, ids: list[int]) -> str:
        if self.tokenizer is None:
            return ""
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    # -- the run ---------------------------------------------------------------------------

    def generate(self, prompts: Sequence, prompt_ids: Sequence | None = None,
                 on_result: Callable[[PromptResult], None] | None = None) -> CloudAI100ExecInfo:
        """Run every prompt; ``on_result`` is called with each prompt's result as it finishes
        (an error row at once; its ``generated_text`` is filled in at the end)."""
        s = self.settings
        finished = on_result or (lambda r: None)
        results = [
            PromptResult(index=i, prompt=p if isinstance(p, str) else repr(p),
                         prompt_id=prompt_ids[i] if prompt_ids is not None else i)
            for i, p in enumerate(prompts)
        ]
        queue: deque[tuple[PromptResult, np.ndarray]] = deque()
        for r, p in zip(results, prompts):
            try:
                ids = self.encode(p)
            except PromptError as e:
                r.finish_reason, r.error = "error", str(e)
                finished(r)
                continue
            r.num_prompt_tokens = int(ids.size)
            queue.append((r, ids))

        if not self.warm_passes:  # every mode starts its first shard warm (engine/warmup.py)
            self.warm_passes = warm_up(self.target, s.full_batch_size, self.k + 1, heads=self.spec.uses_heads,
                                       argmax=not s.sampling)
        self.policy.reset()  # a shard starts from the prior, not from the last shard's verdict
        clock = _Clock()
        self._proposed = np.zeros(self.k, dtype=np.int64)
        self._accepted = np.zeros(self.k, dtype=np.int64)
        free = list(range(s.full_batch_size))
        active: list[_Row] = []
        start = perf_counter()
        batch_ttft = None
        while queue or active:
            while free and queue:
                row = self._prefill(free.pop(0), *queue.popleft(), clock)
                if row.result.finish_reason is None:
                    active.append(row)
                else:
                    free.append(row.slot)
                    finished(row.result)
            if batch_ttft is None:
                batch_ttft = perf_counter() - start
            if not active:
                continue
            done = self._step(active, clock)
            for row in done:
                active.remove(row)
                free.append(row.slot)
                getattr(self.proposer, "finish", _no_finish)(row.slot, row.seq)  # a job-wide index learns it
                finished(row.result)
        e2e = perf_counter() - start
        for r in results:
            r.generated_text = self.decode(r.generated_ids) if r.finish_reason != "error" else ""
        return self._exec_info(prompts, results, clock, e2e, batch_ttft or 0.0)

    def _verify(self, call: SessionCall, proposals: np.ndarray, counts: np.ndarray, rows: Sequence[_Row],
                draft_probs=None) -> Verified:
        """One target forward and the verifier over it: tokens from the device's argmax when
        greedy, logits for speculative sampling (each row's column 0 emits its position
        ``row.n``); the heads' guesses where the mode uses them."""
        sampling = self.settings.sampling
        out = self.target.run(replace(call, argmax=not sampling, head_guesses=self.spec.uses_heads).as_inputs())
        if sampling:
            return verify_sampled(out["logits"], proposals, counts, draft_probs, [r.streams for r in rows],
                                  [r.n for r in rows], self.settings)
        return verify_greedy(out, proposals, counts)

    def _prefill(self, slot: int, result: PromptResult, ids: np.ndarray, clock: _Clock) -> _Row:
        t0 = perf_counter()
        s = self.settings
        # the proposer first: a draft on its own device prefills beside the target (learn settles it)
        self.proposer.start(slot, ids, key=result.prompt_id)
        chunks = list(prefill_chunks(ids, s.prefill_seq_len, slot))
        for call in chunks[:-1]:  # no output needed: tokens only, no heads
            self.target.run(replace(call, argmax=True, head_guesses=False).as_inputs())
        buf = np.zeros(s.ctx_len, dtype=np.int64)
        buf[: ids.size] = ids
        row = _Row(result, slot, buf, int(ids.size), t0)
        if s.sampling:
            row.streams = Streams(s.seed, result.prompt_id)
        none = np.zeros((1, 0), dtype=np.int64)
        verified = self._verify(chunks[-1], none, np.zeros(1, np.int64), [row])
        clock.target_forwards += len(chunks)
        self.proposer.learn([slot], verified)
        self.policy.start(slot)
        result.finish_reason = None
        self._append(row, verified.tokens[0, :1])
        result.ttft_s = result.e2e_s = perf_counter() - t0
        clock.prefill += result.ttft_s
        return row

    def _append(self, row: _Row, tokens) -> None:
        """Append emitted tokens, stopping at EOS, max_new_tokens or the end of the context."""
        s, r = self.settings, row.result
        for t in tokens:
            row.buf[row.n] = t
            row.n += 1
            r.generated_ids.append(int(t))
            if not s.ignore_eos and t in self.eos:
                r.finish_reason = "eos"
            elif len(r.generated_ids) >= s.max_new_tokens:
                r.finish_reason = "length"
            elif row.n >= s.ctx_len:
                r.finish_reason = "ctx_len"
            if r.finish_reason is not None:
                return

    def _limit(self, row: _Row) -> int:
        """Proposals worth verifying: no more than the row may still emit, minus the target's own
        token, and none past the end of the context."""
        remaining = self.settings.max_new_tokens - len(row.result.generated_ids)
        return max(0, min(self.k, remaining - 1, self.settings.ctx_len - row.n - 1))

    def _step(self, rows: list[_Row], clock: _Clock) -> list[_Row]:
        slots = [r.slot for r in rows]
        costly = self.proposer.forwards_per_token
        limits = [self._limit(r) for r in rows]
        if costly:  # proposals cost forwards: decide how many before asking for them
            limits = self.policy.widths(slots, limits, costly)
        t0 = perf_counter()
        proposal = (self.proposer.propose(slots, [r.seq for r in rows], limits) if any(limits)
                    else Proposal.empty(len(rows)))
        t1 = perf_counter()
        counts = [min(len(p), lim) for p, lim in zip(proposal.tokens, limits)]
        if not costly:  # free proposals: keep as many as pay for their verify
            counts = self.policy.widths(slots, counts, 0)
        counts = np.array(counts, dtype=np.int64)
        width = int(counts.max()) + 1
        ids = np.zeros((len(rows), width), dtype=np.int64)
        pos = np.full((len(rows), width), -1, dtype=np.int64)
        for i, (row, p, m) in enumerate(zip(rows, proposal.tokens, counts)):
            ids[i, 0] = row.buf[row.n - 1]
            ids[i, 1 : 1 + m] = p[:m]
            pos[i, : 1 + m] = np.arange(row.n - 1, row.n + m)
        call = SessionCall(ids, pos, np.array(slots, dtype=np.int64),
                           num_logits_to_keep=np.arange(width, dtype=np.int64).reshape(-1, 1))
        verified = self._verify(call, ids[:, 1:], counts, rows, proposal.draft_probs)
        t2 = perf_counter()
        self.policy.update(Step(slots, counts, verified.accepted, costly * max(limits), t1 - t0, t2 - t1,
                                proposal.catch_up))
        clock.draft += t1 - t0
        clock.target += t2 - t1
        clock.iterations += 1
        clock.target_forwards += 1
        self.proposer.learn(slots, verified)
        done = []
        for i, row in enumerate(rows):
            n_acc, m = int(verified.accepted[i]), int(counts[i])
            self._proposed[:m] += 1
            self._accepted[:n_acc] += 1
            row.result.accepted_per_step.append(n_acc + 1)
            row.result.num_decode_iterations += 1
            before = len(row.result.generated_ids)
            self._append(row, verified.tokens[i, : n_acc + 1])
            clock.decode_tokens += len(row.result.generated_ids) - before
            clock.row_steps += 1
            if row.result.finish_reason is not None:
                row.result.e2e_s = t2 - row.t0
                done.append(row)
        return done

    def _exec_info(self, prompts, results, clock: _Clock, e2e: float, batch_ttft: float) -> CloudAI100ExecInfo:
        s = self.settings
        ran = [r for r in results if r.finish_reason != "error"]
        gen = [r.num_generated_tokens for r in results]
        total = sum(gen)
        decode_time = max(e2e - clock.prefill, 0.0)
        steps = [a for r in ran for a in r.accepted_per_step]
        metrics = SpDPerfMetrics(
            mean_ttft=float(np.mean([r.ttft_s for r in ran])) if ran else 0.0,
            batch_ttft=batch_ttft,
            decode_throughput=clock.decode_tokens / decode_time if decode_time > 0 else 0.0,
            e2e_throughput=total / e2e if e2e > 0 else 0.0,
            mean_num_accepted_tokens=float(np.mean(steps)) if steps else 0.0,
            max_gen_len=max(gen, default=0),
            generated_tokens_per_prompt=gen,
            e2e_time=e2e,
            decode_time=decode_time,
            decode_draft_time=clock.draft,
            decode_target_time=clock.target,
            decode_iterations=clock.iterations,
            prefill_time=clock.prefill,
            num_generated_tokens=total,
            num_decode_tokens=clock.decode_tokens,
            num_row_steps=clock.row_steps,
            num_accepted_tokens=int(sum(steps)),
            target_forwards=clock.target_forwards,
            ttft_per_prompt=[r.ttft_s for r in results],
            num_accepted_tokens_per_prompt=[r.mean_num_accepted_tokens for r in results],
            proposed_per_position=self._proposed.tolist(),
            accepted_per_position=self._accepted.tolist(),
            **getattr(self.proposer, "take_stats", dict)(),  # counts of the proposer's own (suffix: by source)
        )
        return CloudAI100ExecInfo(
            prompts=[r.prompt for r in results],
            batch_size=s.full_batch_size,
            generated_texts=[r.generated_text for r in results],
            generated_ids=[np.asarray(r.generated_ids, dtype=np.int64) for r in results],
            perf_metrics=metrics,
            num_speculative_tokens=self.k,
            prefill_seq_len=s.prefill_seq_len,
            ctx_len=s.ctx_len,
            prefill_bsz=1,
            draft_model_name=self.draft_name,
            target_model_name=self.target_name,
            full_batch_size=s.full_batch_size,
            mode=self.mode,
            results=results,
        )
