"""The in-job audit: did speculation change any output, and what did it buy?

Which prompts: a bottom-k sample by hash. Each runnable prompt gets ``sha256(seed, prompt_id)``;
the ``k = max(min_prompts, ceil(fraction * N))`` smallest (at most N, the runnable prompts) are
audited. The choice depends only on the seed and the ids, not on shard order, pair count or a
resume; it is drawn in the dataset's one scan (``Sample``), 16 bytes a row.

How: the pair that ran a shard re-runs the shard's audited prompts on the same session and
settings, in the job's mode (SpD) and in ``baseline`` (the target alone):
  warm-up   the first time a pair audits, its baseline engine runs the prompts once untimed (a
            new engine's first run, like a model's first after load, can be 50% slower than the
            next; the SpD engine has just run them for the job);
  timed     four runs, interleaved: S B B S on even shards, B S S B on odd ones, so a machine
            whose speed drifts (other work starting or stopping) slows both sides alike.
Per prompt:
  match                  the job's output (the row the user gets) is token-identical to the
                         baseline's; otherwise first_diff_position is the first index where they
                         differ (or the shorter length when one is a prefix of the other) with
                         both tokens there (-1 where one output has ended).
  *_time_per_token_s     the prompt's seconds from prefill start to its last token, over its
                         generated tokens, averaged over its two timed runs on each side.
  spd_tokens_per_step    tokens per speculative step of the prompt in its timed SpD runs.
Aggregate: match_rate = matched / audited; speedup = mean baseline time per token / mean SpD
time per token.

A speculative step verifies at least the token a plain decode step computes, over the same
rows, so it is never cheaper than one: a prompt's SpD time per token is at least its baseline
time per token over its tokens per step, and the speedup can be at most the SpD-time-weighted
mean of the audited prompts' tokens per step (``tokens_per_step`` in the summary). A measured
speedup above that (beyond TOLERANCE for timing noise) is an artefact of the timing, not a
figure: it is not reported (``speedup`` None) and ``speedup_note`` says what was measured and
why it was dropped. It is not clamped: a clamped figure would still be a made-up one.

With sampling (temperature > 0) speculative decoding is lossless in distribution, not token by
token: match is left null and match_rate too; the speedup is still measured.
"""

from __future__ import annotations

import hashlib
import math
import weakref
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


TOLERANCE = 0.05  # timing noise: a speedup may exceed its bound by this share before it is dropped
_WARM: "weakref.WeakSet" = weakref.WeakSet()  # baseline engines that ran their warm-up (one per pair)


def _tpt(r) -> Optional[float]:
    n = r.num_generated_tokens
    return float(r.e2e_s / n) if r.finish_reason != "error" and n > 0 else None


def _mean(xs) -> Optional[float]:
    xs = [x for x in xs if x is not None]
    return float(np.mean(xs)) if xs else None


def _tokens_per_step(results) -> Optional[float]:
    """Tokens per step of one prompt over its timed runs (None without steps: an error row)."""
    steps = [a for r in results if r.finish_reason != "error" for a in r.accepted_per_step]
    return float(np.mean(steps)) if steps else None


def audit_rows(job_results: Sequence, spd_results: Sequence, base_results: Sequence, sampling: bool) -> list[dict]:
    """One audit row per prompt from the job's PromptResult of it (what the user gets) and those
    of the timed SpD and baseline re-runs: each a PromptResult, or a sequence of them (one per
    timed run of that side; times are averaged)."""
    def runs(x) -> list:
        return list(x) if isinstance(x, (list, tuple)) else [x]

    rows = []
    for j, s, b in zip(job_results, spd_results, base_results):
        s, b = runs(s), runs(b)
        error = j.error or next((r.error for r in s + b if r.error), None)
        d = None if sampling or error else first_difference(j.generated_ids, b[0].generated_ids)
        rows.append({
            "prompt_id": None if j.prompt_id is None else str(j.prompt_id),
            "match": None if sampling or error else d is None,
            "first_diff_position": None if d is None else d[0],
            "spd_token": None if d is None else d[1],
            "baseline_token": None if d is None else d[2],
            "spd_num_tokens": j.num_generated_tokens,
            "baseline_num_tokens": b[0].num_generated_tokens,
            "spd_time_per_token_s": None if error else _mean(_tpt(r) for r in s),
            "baseline_time_per_token_s": None if error else _mean(_tpt(r) for r in b),
            "spd_tokens_per_step": None if error else _tokens_per_step(s),
            "error": error,
        })
    return rows


def baseline_engine(engine):
    """The target alone over the same session, tokenizer, settings and EOS as ``engine``."""
    from ..engine.engine import SpDEngine

    return SpDEngine("baseline", engine.target, engine.tokenizer, engine.settings,
                     eos_token_ids=engine.eos.tolist(), target_name=engine.target_name)


def run_audit(engine, baseline, shard_id: int, job_results: Sequence, prompts: list, prompt_ids: list) -> list[dict]:
    """Audit rows for prompts the job already ran with ``engine`` (``job_results``). The first
    time ``baseline`` is used it runs the prompts once untimed (warm-up; ``engine`` is warm from
    the job's own run); then both engines run them twice, interleaved: S B B S on even shards,
    B S S B on odd ones (see the module doc)."""
    if baseline not in _WARM:  # ``engine`` has just run these prompts for the job: it is warm
        baseline.generate(prompts, prompt_ids)
        _WARM.add(baseline)
    first, second = (engine, baseline) if shard_id % 2 == 0 else (baseline, engine)
    out: dict = {id(engine): [], id(baseline): []}
    for x in (first, second, second, first):
        out[id(x)].append(x.generate(prompts, prompt_ids).results)
    spd = list(zip(*out[id(engine)]))
    base = list(zip(*out[id(baseline)]))
    return audit_rows(job_results, spd, base, engine.settings.sampling)


def speedup_bound(rows: Sequence[dict]) -> Optional[float]:
    """The most the audit's speedup can be: the mean of the timed rows' tokens per step weighted
    by their SpD time per token (the speedup is mean baseline / mean SpD time per token, and each
    row's baseline time is at most its SpD time times its tokens per step). None when a timed
    row lacks its tokens per step (rows read back from an audit.parquet written before it)."""
    timed = [r for r in rows if r.get("spd_time_per_token_s") and r.get("baseline_time_per_token_s") is not None]
    if not timed or any(r.get("spd_tokens_per_step") is None for r in timed):
        return None
    s = np.array([r["spd_time_per_token_s"] for r in timed], dtype=float)
    t = np.array([r["spd_tokens_per_step"] for r in timed], dtype=float)
    return float((s * t).sum() / s.sum())


def summarize(rows: Sequence[dict]) -> dict:
    """{num_prompts, num_compared, num_matched, match_rate, speedup, tokens_per_step,
    speedup_note} over audit rows (None where undefined); rows with a null match (sampling,
    error rows) are not compared. ``tokens_per_step`` is the bound on the speedup
    (``speedup_bound``); a measured speedup above it (beyond TOLERANCE) is dropped: ``speedup``
    None and ``speedup_note`` saying what was measured."""
    checked = [r["match"] for r in rows if r.get("match") is not None]
    timed = [(r["baseline_time_per_token_s"], r["spd_time_per_token_s"]) for r in rows
             if r.get("spd_time_per_token_s") and r.get("baseline_time_per_token_s") is not None]
    speedup, note = None, None
    if timed:
        base, spd = np.mean([t[0] for t in timed]), np.mean([t[1] for t in timed])
        speedup = float(base / spd) if spd > 0 else None
    bound = speedup_bound(rows)
    if speedup is not None and bound is not None and speedup > bound * (1 + TOLERANCE):
        note = (f"measured {speedup:.2f}x at {bound:.2f} tokens/step: impossible (a speculative step is "
                f"never cheaper than a plain decode step), the timing was disturbed; not reported")
        speedup = None
    return {"num_prompts": len(rows), "num_compared": len(checked), "num_matched": int(sum(checked)),
            "match_rate": float(np.mean(checked)) if checked else None, "speedup": speedup,
            "tokens_per_step": bound, "speedup_note": note}


def describe(summary: dict) -> str:
    """One line for the end of a job."""
    n = summary["num_prompts"]
    if not n:
        return "Audit: off (no prompts audited)"
    rate, c = summary["match_rate"], summary["num_compared"]
    skipped = f"; {n - c} not compared (error rows)" if 0 < c < n else ""
    match = ("n/a (sampling: lossless in distribution, not per token)" if rate is None else
             f"{rate:.2%} ({summary['num_matched']}/{c} token-identical to the target alone{skipped})")
    sp, tps, note = summary["speedup"], summary.get("tokens_per_step"), summary.get("speedup_note")
    if sp is not None:
        speed = f"{sp:.2f}x" + (f" ({tps:.2f} tokens/step)" if tps is not None else "")
    else:
        speed = f"n/a ({note})" if note else "n/a"
    return f"Audit: {n} prompts; match rate {match}; speedup {speed}"
