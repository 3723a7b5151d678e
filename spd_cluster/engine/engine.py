"""The SpD engine: prompts in, ``CloudAI100ExecInfo`` out, over the device-session contract.

Continuous batching over ``full_batch_size`` slots: a prompt takes a free slot, is prefilled in
``prefill_seq_len`` chunks (that gives its first token), then decodes with the others. Each step
the proposer offers up to k tokens per row, the target scores ``[last, d1..dm]`` at positions
``p..p+m`` in one forward, and the verifier keeps the agreeing prefix plus the target's own
token. A finished row frees its slot for the next prompt at once.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from time import perf_counter
from typing import Callable, Sequence

import numpy as np

from ..sessions.base import DeviceSession, prefill_chunks
from .metrics import CloudAI100ExecInfo, PromptResult, SpDPerfMetrics
from .proposers import DraftProposer, MultiProjProposer, NoProposer, PromptLookupProposer, Proposer, greedy_guesses
from .settings import MODES, SpDSettings
from .sampling import row_rng, sample, speculative_sample, warp
from .verifier import greedy_accept


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
    rng: np.random.Generator | None = None  # sampling only: this prompt's own stream

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
    ):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        self.mode, self.target, self.tokenizer = mode, target, tokenizer
        self.settings = settings = settings or SpDSettings()
        self.k = settings.num_speculative_tokens
        self.target_name, self.draft_name = target_name, draft_name
        if target.ctx_len < settings.ctx_len or target.full_batch_size < settings.full_batch_size:
            raise ValueError(
                f"target session has ctx_len={target.ctx_len}, full_batch_size={target.full_batch_size}; "
                f"settings need {settings.ctx_len}, {settings.full_batch_size}"
            )
        if proposer is None:
            proposer = self._default_proposer(mode, draft)
        if mode == "multiproj":
            self.k = min(self.k, target.num_heads)
        self.proposer = proposer
        # A session that computes the heads on demand (see TorchSession.head_guesses) is asked for
        # base logits only; multiproj then fetches the heads' guesses where it needs them, and another
        # mode over a session with heads (the audit's baseline of a multiproj job) never pays for them.
        self.defer_heads = getattr(target, "num_heads", 0) > 0 and hasattr(target, "head_guesses")
        self._extra = {"defer_heads": np.array(True)} if self.defer_heads else {}
        if eos_token_ids is None and tokenizer is not None and tokenizer.eos_token_id is not None:
            eos_token_ids = [tokenizer.eos_token_id]
        self.eos = np.array(sorted(set(eos_token_ids or [])), dtype=np.int64)

    def _default_proposer(self, mode: str, draft: DeviceSession | None) -> Proposer:
        s = self.settings
        if mode == "draft":
            if draft is None:
                raise ValueError("draft mode needs a draft session (or a proposer)")
            if draft.vocab_size != self.target.vocab_size:
                raise ValueError(
                    f"draft and target vocabularies differ: {draft.vocab_size} vs {self.target.vocab_size} tokens"
                )
            return DraftProposer(draft, s.prefill_seq_len, s.num_speculative_tokens, sampling=s,
                                 confidence_threshold=s.confidence_threshold)
        if mode == "pld":
            return PromptLookupProposer(s.max_ngram_size, s.num_speculative_tokens)
        if mode == "multiproj":
            if self.target.num_heads < 1:
                raise ValueError("multiproj needs projection heads: none were found for the target model "
                                 "(give speculator_path, or train them with `spd-cluster train-heads`)")
            lookup = PromptLookupProposer(s.max_ngram_size, s.num_speculative_tokens) if s.prompt_lookup else None
            return MultiProjProposer(self.target.num_heads, s.confidence_threshold, lookup)
        return NoProposer()

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
                finished(row.result)
        e2e = perf_counter() - start
        for r in results:
            r.generated_text = self.decode(r.generated_ids) if r.finish_reason != "error" else ""
        return self._exec_info(prompts, results, clock, e2e, batch_ttft or 0.0)

    def _prefill(self, slot: int, result: PromptResult, ids: np.ndarray, clock: _Clock) -> _Row:
        t0 = perf_counter()
        for inputs in prefill_chunks(ids, self.settings.prefill_seq_len, slot):
            out = self.target.run({**inputs, **self._extra})["logits"]
            clock.target_forwards += 1
        self.proposer.start(slot, ids, key=result.prompt_id)
        s = self.settings
        last = out[0, -1]  # [V] or [H + 1, V]
        if isinstance(self.proposer, MultiProjProposer):
            tokens, probs = (self.target.head_guesses(np.zeros(1, np.int64)) if self.defer_heads
                             else greedy_guesses(last[None, 1:]))
            self.proposer.remember(slot, tokens[0], probs[0])
        if last.ndim == 2:  # a session with heads: base logits only (baseline over a multiproj session)
            last = last[0]
        buf = np.zeros(s.ctx_len, dtype=np.int64)
        buf[: ids.size] = ids
        row = _Row(result, slot, buf, int(ids.size), t0)
        if s.sampling:
            row.rng = row_rng(s.seed, result.prompt_id)
            first = sample(warp(last, s.temperature, s.top_k, s.top_p), row.rng)
        else:
            first = int(last.argmax())
        result.finish_reason = None
        self._append(row, [first])
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
        limits = [self._limit(r) for r in rows]
        t0 = perf_counter()
        proposals = self.proposer.propose([r.slot for r in rows], [r.seq for r in rows], limits)
        t1 = perf_counter()
        counts = np.array([min(len(p), lim) for p, lim in zip(proposals, limits)], dtype=np.int64)
        width = int(counts.max()) + 1
        ids = np.zeros((len(rows), width), dtype=np.int64)
        pos = np.full((len(rows), width), -1, dtype=np.int64)
        for i, (row, p, m) in enumerate(zip(rows, proposals, counts)):
            ids[i, 0] = row.buf[row.n - 1]
            ids[i, 1 : 1 + m] = p[:m]
            pos[i, : 1 + m] = np.arange(row.n - 1, row.n + m)
        logits = self.target.run({
            "input_ids": ids,
            "position_ids": pos,
            "batch_index": np.array([[r.slot] for r in rows], dtype=np.int64),
            "num_logits_to_keep": np.arange(width, dtype=np.int64).reshape(-1, 1),
            **self._extra,
        })["logits"]
        tokens = logits.argmax(-1)  # [B, W] or [B, W, H + 1]
        t2 = perf_counter()
        clock.draft += t1 - t0
        clock.target += t2 - t1
        clock.iterations += 1
        clock.target_forwards += 1
        target_tokens = tokens[..., 0] if tokens.ndim == 3 else tokens
        if self.settings.sampling:
            base = logits[:, :, 0] if logits.ndim == 4 else logits
            accepted, target_tokens = self._sample_accept(rows, ids, counts, base)
        else:
            accepted = greedy_accept(ids[:, 1:], counts, target_tokens)
        guesses = None
        if isinstance(self.proposer, MultiProjProposer):  # the heads' guesses where each row's accepted prefix ends
            guesses = (self.target.head_guesses(accepted) if self.defer_heads
                       else greedy_guesses(logits[np.arange(len(rows)), accepted, 1:]))
        done = []
        for i, row in enumerate(rows):
            n_acc, m = int(accepted[i]), int(counts[i])
            self._proposed[:m] += 1
            self._accepted[:n_acc] += 1
            row.result.accepted_per_step.append(n_acc + 1)
            row.result.num_decode_iterations += 1
            before = len(row.result.generated_ids)
            self._append(row, target_tokens[i, : n_acc + 1])
            clock.decode_tokens += len(row.result.generated_ids) - before
            clock.row_steps += 1
            if row.result.finish_reason is not None:
                row.result.e2e_s = t2 - row.t0
                done.append(row)
            elif guesses is not None:
                self.proposer.remember(row.slot, guesses[0][i], guesses[1][i])
        return done

    def _sample_accept(self, rows, ids, counts, base):
        """Speculative sampling per row; returns accepted counts and, per row, the tokens it
        emits laid out like greedy's target tokens (accepted proposals, then the sampled one)."""
        s = self.settings
        q_of = getattr(self.proposer, "draft_probs", None)
        accepted = np.zeros(len(rows), dtype=np.int64)
        emitted = ids[:, 1:].copy()
        emitted = np.concatenate([emitted, np.zeros((len(rows), 1), dtype=np.int64)], axis=1)
        for i, row in enumerate(rows):
            m = int(counts[i])
            p = warp(base[i, : m + 1], s.temperature, s.top_k, s.top_p)
            q = q_of(row.slot) if (q_of is not None and m) else None
            n, tok = speculative_sample(p, ids[i, 1 : 1 + m], None if q is None else q[:m], row.rng)
            accepted[i] = n
            emitted[i, n] = tok
        return accepted, emitted

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
