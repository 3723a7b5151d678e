"""The seed's metric dataclasses, with the definitions written down (each SpDPerfMetrics field
also carries its unit and a one-line description, which io/results.py puts in the Parquet files).

Definitions per engine run (one shard). A job's figures are made from its shards' by the rules in
engine/reduce.py, which also defines, once, the throughputs of a job, a pair and a shard:
  ttft (per prompt)         seconds from the start of a prompt's prefill to its first token.
  mean_ttft                 mean of the per-prompt TTFTs.
  batch_ttft                seconds from the run's start until every slot of the first batch
                            (the first min(full_batch_size, n_prompts) prompts) had its first token.
  e2e_time                  wall seconds of the whole run (a job: its wall time less the audit's
                            share, engine/reduce.py).
  decode_time               e2e_time minus the time spent in prefill.
  decode_draft_time         seconds spent in the proposer (draft forwards, n-gram lookup).
  decode_target_time        seconds spent in target verify forwards.
  decode_iterations         speculative steps: one target verify forward over the active slots.
  num_generated_tokens      tokens generated for a prompt, the one from prefill included
                            (HF `generate` counts the same way; the seed added one more).
  generated_tokens_per_prompt  num_generated_tokens of each prompt.
  decode_throughput         tokens/s: tokens emitted by decode steps / decode_time (a job: per
                            pair, decode tokens / decode pair-seconds).
  e2e_throughput            tokens/s: all generated tokens / e2e_time.
  accepted tokens per step  tokens a row emits in one step: the accepted proposals plus the
                            target's own token (the bonus token counts, as in the seed), so a
                            step emits between 1 and k + 1.
  num_accepted_tokens       accepted tokens per step summed over all (row, step) pairs.
  mean_num_accepted_tokens  mean of accepted tokens per step over all (row, step) pairs
                            (num_accepted_tokens / num_row_steps).
  acceptance_rate_per_position[i]  of the steps that proposed a token at speculative position
                            i + 1, the fraction whose token at i + 1 was accepted.
  max_gen_len               the largest num_generated_tokens of any prompt.
  target_forwards           every target session call: prefill chunks plus verify steps.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np

FINISH_REASONS = ("eos", "length", "ctx_len", "error")


@dataclass
class PromptResult:
    """What one prompt produced."""

    index: int
    prompt: str
    prompt_id: object = None
    generated_ids: list[int] = field(default_factory=list)
    generated_text: str = ""
    num_prompt_tokens: int = 0
    finish_reason: str = "length"  # eos | length | ctx_len | error
    error: Optional[str] = None
    ttft_s: float = 0.0
    e2e_s: float = 0.0
    num_decode_iterations: int = 0
    accepted_per_step: list[int] = field(default_factory=list)

    @property
    def num_generated_tokens(self) -> int:
        return len(self.generated_ids)

    @property
    def num_accepted_tokens(self) -> int:
        """Tokens per step summed over this prompt's steps (mean_num_accepted_tokens * steps)."""
        return int(sum(self.accepted_per_step))

    @property
    def mean_num_accepted_tokens(self) -> float:
        steps = self.accepted_per_step
        return float(sum(steps) / len(steps)) if steps else 0.0


def _m(unit: str, doc: str, per_prompt: bool = False, **kw):
    """A metric field with its unit ("s", "tokens", "tokens/s", "count", "" for none) and a one-line
    description: the one definition that io/results.py turns into Parquet field metadata.
    ``per_prompt``: a list with one value per prompt, kept in memory (the seed's printed ExecInfo)
    but in no shard record and no Parquet column: results/*.parquet has it per prompt_id."""
    return field(metadata={"unit": unit, "doc": doc, "per_prompt": per_prompt}, **kw)


@dataclass
class SpDPerfMetrics:
    mean_ttft: float = _m("s", "mean over the prompts run (not error rows) of the seconds from prefill start to first token")
    batch_ttft: float = _m("s", "seconds from the start until every slot of the first batch had its first token")
    decode_throughput: float = _m("tokens/s", "tokens emitted by decode steps / decode_time: one pair's decode speed (a job: summed decode tokens / summed decode pair-seconds)")
    e2e_throughput: float = _m("tokens/s", "all generated tokens / e2e_time")
    mean_num_accepted_tokens: float = _m("tokens", "tokens per speculative step over all (row, step) pairs (accepted proposals + the target's own): num_accepted_tokens / num_row_steps")
    max_gen_len: int = _m("tokens", "the largest num_generated_tokens of any prompt")
    generated_tokens_per_prompt: list[int] = _m("tokens", "num_generated_tokens of each prompt", per_prompt=True)
    e2e_time: float = _m("s", "wall seconds of the run (a job: job wall time summed over its runs, actor start-up included, less the audit's share audit_wall_time_s)")
    decode_time: float = _m("s", "e2e_time minus prefill time (a job: summed over shards, pair-seconds)")
    decode_draft_time: float = _m("s", "seconds in the proposer: draft forwards, n-gram lookup (a job: summed, pair-seconds)")
    decode_target_time: float = _m("s", "seconds in target verify forwards (a job: summed, pair-seconds)")
    decode_iterations: int = _m("count", "speculative steps: one target verify forward over the active slots")
    # added for analytics
    prefill_time: float = _m("s", "seconds spent in prefill (a job: summed, pair-seconds)", default=0.0)
    num_generated_tokens: int = _m("tokens", "tokens generated, the prefill token of each prompt included", default=0)
    num_decode_tokens: int = _m("tokens", "tokens emitted by decode steps (after EOS / length truncation)", default=0)
    num_row_steps: int = _m("count", "(row, step) pairs: speculative steps summed over the rows they advanced", default=0)
    num_accepted_tokens: int = _m("tokens", "tokens per step summed over all (row, step) pairs (before truncation)", default=0)
    target_forwards: int = _m("count", "target session calls: prefill chunks plus verify steps", default=0)
    ttft_per_prompt: list[float] = _m("s", "ttft of each prompt", per_prompt=True, default_factory=list)
    num_accepted_tokens_per_prompt: list[float] = _m("tokens", "mean tokens per step of each prompt", per_prompt=True,
                                                     default_factory=list)
    proposed_per_position: list[int] = _m("count", "steps that proposed a token at speculative position i + 1", default_factory=list)
    accepted_per_position: list[int] = _m("count", "steps whose proposal at position i + 1 was accepted", default_factory=list)
    # suffix mode (engine/suffix.py): where its proposals came from, the row's own text or the job's finished outputs
    suffix_steps_row: int = _m("count", "suffix: (row, step) pairs that proposed from the row's own prompt and text", default=0)
    suffix_steps_job: int = _m("count", "suffix: (row, step) pairs that proposed from the job's finished outputs", default=0)
    suffix_proposed_row: int = _m("tokens", "suffix: tokens proposed from the row's own text (before adaptive k cut them to the step's width)", default=0)
    suffix_proposed_job: int = _m("tokens", "suffix: tokens proposed from the job's finished outputs (before adaptive k cut them)", default=0)
    suffix_accepted_row: int = _m("tokens", "suffix: proposed tokens accepted on steps that proposed from the row's own text", default=0)
    suffix_accepted_job: int = _m("tokens", "suffix: proposed tokens accepted on steps that proposed from the job's finished outputs", default=0)

    @property
    def acceptance_rate_per_position(self) -> list[float]:
        return [a / p if p else 0.0 for a, p in zip(self.accepted_per_position, self.proposed_per_position)]


@dataclass
class CloudAI100ExecInfo:
    prompts: list[str]
    batch_size: int
    generated_texts: list[str]
    generated_ids: list[np.ndarray]
    perf_metrics: SpDPerfMetrics
    num_speculative_tokens: int
    prefill_seq_len: int
    ctx_len: int
    prefill_bsz: int
    draft_model_name: str
    target_model_name: str
    full_batch_size: Optional[int]
    mode: str = "draft"
    results: list[PromptResult] = field(default_factory=list)
    # set by a job's audit (cluster/audit.py): None when not audited / not comparable
    audit_match_rate: Optional[float] = None
    audit_speedup: Optional[float] = None
    # set for a job (engine/reduce.py): the clock its throughputs were made over
    job_wall_time_s: Optional[float] = None
    actor_startup_s: Optional[float] = None
    audit_wall_time_s: Optional[float] = None

    def __repr__(self) -> str:
        m = self.perf_metrics
        return (
            f"Avg TLM+DLM TTFT = {round(m.mean_ttft, 2)} s\n"
            f"Total TLM+DLM Batch TTFT = {round(m.batch_ttft, 2)} s\n"
            f"Decode Throughput = {round(m.decode_throughput, 2)} tokens/s"
            + (" per pair (decode tokens / decode pair-seconds)\n" if self.job_wall_time_s is not None else "\n")
            + f"E2E Throughput = {round(m.e2e_throughput, 2)} tokens/s"
            + (f" ({m.num_generated_tokens} tokens / {m.e2e_time:.2f} s)\n" if self.job_wall_time_s is not None
               else "\n")
            + (f"Job Wall Time = {self.job_wall_time_s:.2f} s (actor start-up {self.actor_startup_s or 0.0:.2f} s; "
               f"audit {self.audit_wall_time_s or 0.0:.2f} s, not in the throughputs)\n"
               if self.job_wall_time_s is not None else "")
            + f"Avg number of accepted tokens = {round(m.mean_num_accepted_tokens, 2)}\n"
            f"Max generation len = {m.max_gen_len}\n"
            + (f"Total Generated Tokens per Prompt: = {m.generated_tokens_per_prompt}" if m.generated_tokens_per_prompt
               else f"Total Generated Tokens = {m.num_generated_tokens}")  # a job's: per prompt in its results
        )

    __str__ = __repr__
