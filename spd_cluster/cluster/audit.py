"""The in-job audit: did speculation change any output, and what did it buy?

Which prompts: a bottom-k sample by hash. Each runnable prompt gets ``sha256(seed, prompt_id)``;
the ``k = max(min_prompts, ceil(fraction * N))`` smallest (at most N, the runnable prompts) are
audited. The choice depends only on the seed and the ids, not on shard order, pair count or a
resume; it is drawn in the dataset's one scan (``Sample``), 16 bytes a row.

How: the pair that ran a shard re-runs the shard's audited prompts twice, back to back on the
same session and settings: once in the job's mode and once in ``baseline`` (the target alone),
alternating which goes first by shard, so both see the same load. Per prompt:
  match                  the job's output (the row the user gets) is token-identical to the
                         baseline's; otherwise first_diff_position is the first index where they
                         differ (or the shorter length when one is a prefix of the other) with
                         both tokens there (-1 where one output has ended).
  *_time_per_token_s     the prompt's seconds from prefill start to its last token, over its
                         generated tokens, in each timed re-run.
Aggregate: match_rate = matched / audited; speedup = mean baseline time per token / mean SpD
time per token (the same rule the report applies to a partial audit.parquet).

With sampling (temperature > 0) speculative decoding is lossless in distribution, not token by
token: match is left null and match_rate too; the speedup is still measured.
"""

from __future__ import annotations

import hashlib
import math
from typing import Optional, Sequence

import numpy as np


def audit_key(seed: int, prompt_id) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}\x00{prompt_id}".encode()).digest()[:8], "big")


def audit_size(fraction: float, min_prompts: int, n: int) -> int:
    if fraction <= 0 or n <= 0:
        return 0
    return min(n, max(min_prompts, math.ceil(fraction * n)))


class Sample:
    """The audit's sample, drawn while the dataset is scanned (pass ``add`` as scan's
    ``observe``): every runnable row's key, kept as 16 bytes a row; ``picks`` then chooses."""

    def __init__(self, seed: int):
        from array import array

        self.seed = seed
        self.keys, self.rows = array("Q"), array("q")

    def add(self, row) -> None:
        if row.error is None:
            self.keys.append(audit_key(self.seed, row.prompt_id))
            self.rows.append(row.row)

    def picks(self, fraction: float, min_prompts: int, num_rows: int, shard_size: int) -> dict[int, list[int]]:
        """shard_id -> positions (in ``shard.rows``) of its audited rows; as ``pick``, by key."""
        k = min(audit_size(fraction, min_prompts, num_rows), len(self.keys))
        if k == 0:
            return {}
        keys = np.frombuffer(self.keys, dtype=np.uint64)
        rows = np.frombuffer(self.rows, dtype=np.int64)
        chosen: dict[int, list[int]] = {}
        for i in np.argpartition(keys, k - 1)[:k] if k < keys.size else range(keys.size):
            sid, pos = divmod(int(rows[i]), shard_size)
            chosen.setdefault(sid, []).append(pos)
        return {sid: sorted(v) for sid, v in sorted(chosen.items())}


def first_difference(a: Sequence[int], b: Sequence[int]) -> Optional[tuple[int, int, int]]:
    """None when equal, else (position, a's token, b's token); -1 for a token past an end."""
    a, b = np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64)
    n = min(a.size, b.size)
    diff = np.flatnonzero(a[:n] != b[:n])
    if diff.size:
        i = int(diff[0])
    elif a.size == b.size:
        return None
    else:
        i = n
    return i, int(a[i]) if i < a.size else -1, int(b[i]) if i < b.size else -1


def _tpt(r) -> Optional[float]:
    n = r.num_generated_tokens
    return float(r.e2e_s / n) if r.finish_reason != "error" and n > 0 else None


def audit_rows(job_results: Sequence, spd_results: Sequence, base_results: Sequence, sampling: bool) -> list[dict]:
    """One audit row per prompt from three PromptResults of it: the job's (what the user gets)
    and those of the timed SpD and baseline re-runs."""
    rows = []
    for j, s, b in zip(job_results, spd_results, base_results):
        error = j.error or s.error or b.error
        d = None if sampling or error else first_difference(j.generated_ids, b.generated_ids)
        rows.append({
            "prompt_id": None if j.prompt_id is None else str(j.prompt_id),
            "match": None if sampling or error else d is None,
            "first_diff_position": None if d is None else d[0],
            "spd_token": None if d is None else d[1],
            "baseline_token": None if d is None else d[2],
            "spd_num_tokens": j.num_generated_tokens,
            "baseline_num_tokens": b.num_generated_tokens,
            "spd_time_per_token_s": _tpt(s),
            "baseline_time_per_token_s": _tpt(b),
            "error": error,
        })
    return rows


def baseline_engine(engine):
    """The target alone over the same session, tokenizer, settings and EOS as ``engine``."""
    from ..engine.engine import SpDEngine

    return SpDEngine("baseline", engine.target, engine.tokenizer, engine.settings,
                     eos_token_ids=engine.eos.tolist(), target_name=engine.target_name)


def run_audit(engine, baseline, shard_id: int, job_results: Sequence, prompts: list, prompt_ids: list) -> list[dict]:
    """Audit rows for prompts the job already ran with ``engine`` (``job_results``): both engines
    re-run them back to back; which goes first alternates by shard so neither always runs warm."""
    runs = [engine, baseline] if shard_id % 2 == 0 else [baseline, engine]
    res = [x.generate(prompts, prompt_ids).results for x in runs]
    spd, base = (res[0], res[1]) if shard_id % 2 == 0 else (res[1], res[0])
    return audit_rows(job_results, spd, base, engine.settings.sampling)


def summarize(rows: Sequence[dict]) -> dict:
    """{num_prompts, num_compared, num_matched, match_rate, speedup} over audit rows (None where
    undefined); rows with a null match (sampling, error rows) are not compared."""
    checked = [r["match"] for r in rows if r.get("match") is not None]
    timed = [(r["baseline_time_per_token_s"], r["spd_time_per_token_s"]) for r in rows
             if r.get("spd_time_per_token_s") and r.get("baseline_time_per_token_s") is not None]
    speedup = None
    if timed:
        base, spd = np.mean([t[0] for t in timed]), np.mean([t[1] for t in timed])
        speedup = float(base / spd) if spd > 0 else None
    return {"num_prompts": len(rows), "num_compared": len(checked), "num_matched": int(sum(checked)),
            "match_rate": float(np.mean(checked)) if checked else None, "speedup": speedup}


def describe(summary: dict) -> str:
    """One line for the end of a job."""
    n = summary["num_prompts"]
    if not n:
        return "Audit: off (no prompts audited)"
    rate, c = summary["match_rate"], summary["num_compared"]
    skipped = f"; {n - c} not compared (error rows)" if 0 < c < n else ""
    match = ("n/a (sampling: lossless in distribution, not per token)" if rate is None else
             f"{rate:.2%} ({summary['num_matched']}/{c} token-identical to the target alone{skipped})")
    sp = summary["speedup"]
    return f"Audit: {n} prompts; match rate {match}; speedup {'n/a' if sp is None else f'{sp:.2f}x'}"
