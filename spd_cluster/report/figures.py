"""The report's second stage: the numbers behind its table, page and PNGs, made from what
data.py read with the rules of engine/reduce.py (no figure is defined here a second time).

  aggregates                exec_info.parquet when the job has ended (reduce wrote it); while it
                            runs (or without that file) reduce_records over the shard records
                            written so far and the job's clock in job.json (each run's wall_s and
                            actor_startup_s, as `status` reads them); without that clock, first
                            shard start to last shard end, labelled approx.
  accepted tokens per step  exact, reduce's step_counts over the summed per-position counts.
                            Without shard records the per-prompt means from results/ are shown
                            instead, and labelled so.
  per pair, per shard       reduce's pair_figures and shard_figures: tokens / busy seconds (the
                            audit's re-runs left out), decode tokens / decode seconds, tokens per
                            step, proposal width, and a shard's audit speedup where it was audited
                            (cluster/audit.py's summarize over its rows).
  tokens/s per pair chart   each shard's generated tokens spread evenly over its busy seconds
                            [start, start + busy_s] (start = finished_at - wall_s; the audit's
                            re-runs follow the shard's own run), summed per time bin.
  audit                     exec_info's match rate and speedup when the job has ended, else
                            audit.parquet's rows with the audit's own rule (cluster/audit.py's
                            summarize), which also gives each audited shard its speedup.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

import numpy as np
import pandas as pd

from ..cluster import audit as audit_mod
from ..engine import reduce as rd
from ..engine.modes import MODES, mode as mode_of
from .data import JobData

SHARD_COLUMNS = ["shard_id", "pair_id", "attempts", "tokens", "e2e_time", "wall_s", "busy_s", "audit_s", "start_s",
                 "busy_end_s", "end_s", "row_steps", "tokens_per_step", "proposal_width", "e2e_throughput",
                 "decode_throughput", "audited", "speedup"]
PAIR_COLUMNS = ["pair_id", "shards", "prompts", "tokens", "busy_s", "tokens_per_s", "decode_tokens_per_s",
                "tokens_per_step", "proposal_width"]


def _num(x: Any) -> Optional[float]:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(v) else v


def _ints(x: Any) -> list[int]:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return []
    return [int(v) for v in x]


def _cfg(job: Optional[dict], *path: str) -> Any:
    cur: Any = (job or {}).get("config")
    for p in path:
        if not isinstance(cur, dict):
            return None
        cur = cur.get(p)
    return cur


@dataclasses.dataclass
class Figures:
    """The numbers behind the table, the page and the PNGs."""

    name: str
    mode: str
    status: str
    running: bool
    k: int
    prompts_total: Optional[int]
    prompts_done: int
    errors: int
    shards_total: Optional[int]
    shards_done: int
    tokens: int
    wall_s: Optional[float]          # the job wall time W (start-up and the audit in it)
    e2e_throughput: Optional[float]
    decode_throughput: Optional[float]
    mean_accepted: Optional[float]
    batch_ttft: Optional[float]
    aggregate_source: str
    step_counts: dict[int, int]      # tokens emitted in one step -> number of (row, step) pairs
    step_source: str                 # "exact" | "per-prompt means" | ""
    prompt_means: np.ndarray         # per-prompt mean accepted tokens per step (ran prompts)
    proposed: list[int]
    accepted: list[int]
    ttft: np.ndarray
    shard_rows: pd.DataFrame         # SHARD_COLUMNS: the shards on the job's clock, with their figures
    pairs: pd.DataFrame              # PAIR_COLUMNS
    audit: Optional[dict]
    e2e_time: Optional[float] = None         # what e2e_throughput divides by: W less the audit's share
    actor_startup_s: Optional[float] = None  # in W, apart
    audit_wall_s: Optional[float] = None     # the audit's share of W, apart
    wall_approx: bool = False                # W from the shards' span (no clock in job.json)
    proposal_width: Optional[float] = None   # tokens proposed per (row, step) over the job

    @property
    def rates(self) -> list[float]:
        return [a / p if p else 0.0 for a, p in zip(self.accepted, self.proposed)]

    @property
    def partial(self) -> bool:
        return self.shards_total is not None and self.shards_done < self.shards_total


def _speedup(rows: list[dict]) -> Optional[float]:
    """The audit's speedup over these rows, by the audit's own rule (cluster/audit.py), the one
    exec_info.parquet holds; None without timed rows."""
    if not rows:
        return None
    clean = [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()} for r in rows]
    return audit_mod.summarize(clean)["speedup"]


def _audit_by_shard(data: JobData) -> dict[int, list[dict]]:
    a = data.audit
    if a is None or not len(a) or "shard_id" not in a:
        return {}
    out: dict[int, list[dict]] = {}
    for r in a.to_dict("records"):
        sid = _num(r.get("shard_id"))
        if sid is not None:
            out.setdefault(int(sid), []).append(r)
    return out


def shard_rows(data: JobData) -> pd.DataFrame:
    """Every written shard with reduce's shard_figures, on the job's clock (seconds since the
    first shard started): [start_s, busy_end_s] its own run, [busy_end_s, end_s] the audit's."""
    sh = data.shards
    if not len(sh):
        return pd.DataFrame(columns=SHARD_COLUMNS)
    audits = _audit_by_shard(data)
    figs = pd.DataFrame([rd.shard_figures(r, _speedup(audits.get(int(r["shard_id"]), [])),
                                          len(audits.get(int(r["shard_id"]), []))) for r in data.records])
    s = pd.DataFrame({"shard_id": sh["shard_id"].astype(int)})
    figs = s.merge(figs.drop(columns=["pair_id"]), on="shard_id", how="left")
    nan = pd.Series(np.nan, index=sh.index)
    s["pair_id"] = sh.get("pair_id", nan)
    s["attempts"] = sh.get("attempts", pd.Series(1, index=sh.index))
    s["e2e_time"] = sh.get("e2e_time", nan)
    s["wall_s"] = sh.get("wall_s", nan)
    for c in ("tokens", "busy_s", "audit_s", "row_steps", "tokens_per_step", "proposal_width", "e2e_throughput",
              "decode_throughput", "audited", "speedup"):
        s[c] = pd.to_numeric(figs[c], errors="coerce").to_numpy()
    s["tokens"] = s["tokens"].fillna(0)
    end = pd.to_datetime(sh.get("finished_at", pd.Series(None, index=sh.index)), utc=True, errors="coerce")
    start = end - pd.to_timedelta(s["wall_s"].fillna(0), unit="s")
    t0 = start.min()
    s["start_s"] = (start - t0).dt.total_seconds()
    s["end_s"] = (end - t0).dt.total_seconds()
    # finished_at has whole seconds: a pair runs one shard at a time, so a shard starts no
    # earlier than the pair's previous shard ended
    order = s.sort_values(["end_s"], kind="stable")
    prev_end = order.groupby(order["pair_id"].fillna(-1))["end_s"].shift().reindex(s.index)
    later = prev_end < s["end_s"]
    s.loc[later, "start_s"] = np.fmax(s.loc[later, "start_s"], prev_end[later])
    s["busy_end_s"] = np.fmin(s["start_s"] + s["busy_s"].fillna(s["wall_s"]), s["end_s"])
    return s[SHARD_COLUMNS]


def pair_table(data: JobData) -> pd.DataFrame:
    rows = rd.pair_figures(data.records)
    if not rows:
        return pd.DataFrame(columns=PAIR_COLUMNS)
    p = pd.DataFrame(rows).rename(columns={"e2e_throughput": "tokens_per_s", "decode_throughput": "decode_tokens_per_s"})
    p["prompts"] = pd.to_numeric(p["prompts"], errors="coerce")
    p["tokens_per_s"] = p["tokens_per_s"].where(p["busy_s"] > 0)
    return p[PAIR_COLUMNS]


def compute(data: JobData) -> Figures:
    job, ei, res = data.job, data.exec_info, data.results
    status = str((job or {}).get("status") or ("completed" if ei else "unknown"))
    running = status == "running"
    use_ei = ei is not None and not running
    name = (job or {}).get("name") or (ei or {}).get("name") or data.out.name
    mode = _cfg(job, "mode") or (ei or {}).get("mode") or "?"
    k = _cfg(job, "spd", "num_speculative_tokens")
    if k is None and ei is not None:
        k = _num(ei.get("num_speculative_tokens"))
    prompts_total = (job or {}).get("dataset", {}).get("num_rows") if job else None
    if prompts_total is None and ei is not None:
        prompts_total = _num(ei.get("num_prompts"))
    shards_total = (job or {}).get("num_shards") if job else None
    if shards_total is None and ei is not None:
        shards_total = _num(ei.get("num_shards"))

    srows = shard_rows(data)
    pairs = pair_table(data)
    ran = res[res["finish_reason"] != "error"] if len(res) else res
    ttft = pd.to_numeric(ran["ttft_s"], errors="coerce").dropna().to_numpy(float) if len(ran) else np.array([])
    means = ran.loc[pd.to_numeric(ran["num_decode_iterations"], errors="coerce") > 0, "mean_num_accepted_tokens"] \
        if len(ran) else pd.Series(dtype=float)
    prompt_means = pd.to_numeric(means, errors="coerce").dropna().to_numpy(float)

    # the job's aggregate: reduce's, as exec_info.parquet holds it or over the records so far
    wall, startup = rd.job_clock(job)
    approx = False
    if wall is None and len(srows) and srows["end_s"].notna().any():
        wall, approx = float(srows["end_s"].max() - srows["start_s"].min()), True
    jf = rd.reduce_records(data.records, wall or 0.0, startup)
    m = jf.metrics
    tokens_total = int(m.num_generated_tokens) if data.records else int(pd.to_numeric(
        res.get("num_generated_tokens", pd.Series(dtype=float)), errors="coerce").fillna(0).sum())
    row_steps, proposed, accepted = m.num_row_steps, list(m.proposed_per_position), list(m.accepted_per_position)
    if use_ei:
        src = "exec_info.parquet"
        e2e_s, audit_wall = _num(ei.get("e2e_time")), _num(ei.get("audit_wall_time_s"))
        startup = _num(ei.get("actor_startup_s"))
        wall = e2e_s + (audit_wall or 0.0) if e2e_s is not None else None
        approx = False
        e2e_tps, dec_tps = _num(ei.get("e2e_throughput")), _num(ei.get("decode_throughput"))
        mean_acc, batch_ttft = _num(ei.get("mean_num_accepted_tokens")), _num(ei.get("batch_ttft"))
        tokens_total = int(_num(ei.get("num_generated_tokens")) or tokens_total)
        row_steps = int(_num(ei.get("num_row_steps")) or row_steps)
        if ei.get("proposed_per_position") is not None:
            proposed, accepted = _ints(ei["proposed_per_position"]), _ints(ei["accepted_per_position"])
    else:
        src = f"{len(srows)} shard record(s) so far" if len(srows) else "nothing finished yet"
        e2e_s, audit_wall = (jf.e2e_time, jf.audit_wall_time_s) if wall else (None, None)
        e2e_tps = m.e2e_throughput if wall else None
        dec_tps = m.decode_throughput if m.decode_time > 0 and wall else None
        mean_acc = m.mean_num_accepted_tokens if row_steps else (float(prompt_means.mean()) if len(prompt_means)
                                                                 else None)
        batch_ttft = None
    k = int(k) if k is not None else len(proposed)
    if mode in MODES and not mode_of(mode).speculates:
        k = 0
    counts = rd.step_counts(accepted, row_steps) if row_steps and (len(accepted) or k == 0) else {}
    step_source = "exact" if counts else ("per-prompt means" if len(prompt_means) else "")

    return Figures(
        name=str(name), mode=str(mode), status=status, running=running, k=k,
        prompts_total=int(prompts_total) if prompts_total is not None else None,
        prompts_done=len(res), errors=int((res["finish_reason"] == "error").sum()) if len(res) else 0,
        shards_total=int(shards_total) if shards_total is not None else None, shards_done=len(srows),
        tokens=tokens_total, wall_s=wall, e2e_throughput=e2e_tps, decode_throughput=dec_tps,
        mean_accepted=mean_acc, batch_ttft=batch_ttft, aggregate_source=src, step_counts=counts,
        step_source=step_source, prompt_means=prompt_means, proposed=proposed[:k] if k else [],
        accepted=accepted[:k] if k else [], ttft=ttft, shard_rows=srows, pairs=pairs,
        audit=_audit(data, use_ei), e2e_time=e2e_s, actor_startup_s=startup, audit_wall_s=audit_wall,
        wall_approx=approx, proposal_width=rd.proposal_width(proposed, row_steps) if k else None,
    )


def _audit(data: JobData, use_ei: bool) -> Optional[dict]:
    ei = data.exec_info or {}
    a = data.audit
    if a is None:
        rate, speed = _num(ei.get("audit_match_rate")), _num(ei.get("audit_speedup"))
        if rate is None and speed is None:
            return None
        return {"n": None, "matched": None, "checked": None, "match_rate": rate, "speedup": speed, "spd_tpt": None,
                "base_tpt": None, "per_prompt": None, "mismatches": pd.DataFrame(),
                "source": "exec_info.parquet (audit.parquet not found)"}
    # match is null where it was not compared (sampling: lossless in distribution only; an error row)
    raw = a["match"] if "match" in a else pd.Series(None, index=a.index, dtype=object)
    checked = raw.notna()
    match = raw.where(checked, False).astype(bool)
    spd = pd.to_numeric(a.get("spd_time_per_token_s", pd.Series(np.nan, index=a.index)), errors="coerce")
    base = pd.to_numeric(a.get("baseline_time_per_token_s", pd.Series(np.nan, index=a.index)), errors="coerce")
    both = spd.notna() & base.notna() & (spd > 0)
    spd_tpt = float(spd[both].mean()) if both.any() else None
    base_tpt = float(base[both].mean()) if both.any() else None
    speed = _speedup(a.to_dict("records"))
    source = "audit.parquet"
    if use_ei and _num(ei.get("audit_speedup")) is not None:
        speed, source = _num(ei.get("audit_speedup")), "audit.parquet; speedup from exec_info.parquet"
    cols = [c for c in ("prompt_id", "first_diff_position", "spd_token", "baseline_token") if c in a]
    return {"n": len(a), "matched": int(match.sum()), "checked": int(checked.sum()),
            "match_rate": float(match[checked].mean()) if checked.any() else None,
            "speedup": speed, "spd_tpt": spd_tpt, "base_tpt": base_tpt,
            "per_prompt": pd.DataFrame({"speedup": (base / spd.where(spd > 0))[both], "match": (match | ~checked)[both]}),
            "mismatches": _whole_numbers(a.loc[checked & ~match, cols].reset_index(drop=True)), "source": source}


def _whole_numbers(df: pd.DataFrame) -> pd.DataFrame:
    """Integer columns that pandas made float because of nulls, back to integers."""
    for c in df.columns:
        col = df[c]
        if pd.api.types.is_float_dtype(col) and (col.dropna() % 1 == 0).all():
            df[c] = col.astype("Int64")
    return df


def pair_rates(shard_rows: pd.DataFrame, nbins: int = 120) -> tuple[np.ndarray, dict[int, np.ndarray]]:
    """Tokens/s of each pair over the job's clock: each shard's tokens spread evenly over its busy
    seconds (start_s to busy_end_s; end_s where there is no busy_end_s), summed per time bin.
    Returns bin edges and, per pair, the rate in each bin."""
    s = shard_rows.dropna(subset=["start_s", "end_s", "pair_id"]) if len(shard_rows) else shard_rows
    if not len(s):
        return np.array([]), {}
    lo, hi = float(s["start_s"].min()), float(s["end_s"].max())
    edges = np.linspace(lo, hi if hi > lo else lo + 1.0, nbins + 1)
    width = edges[1] - edges[0]
    out = {}
    for pid, g in s.groupby(s["pair_id"].astype(int)):
        st = g["start_s"].to_numpy(float)
        en = (g["busy_end_s"].fillna(g["end_s"]) if "busy_end_s" in g else g["end_s"]).to_numpy(float)
        tok = g["tokens"].to_numpy(float)
        span = en > st
        rate = np.where(span, tok / np.where(span, en - st, 1.0), 0.0)[:, None]
        overlap = np.clip(np.minimum(edges[1:][None, :], en[:, None]) - np.maximum(edges[:-1][None, :], st[:, None]),
                          0, None)
        ys = (overlap * rate).sum(0) / width
        # a shard with no measurable interval: its tokens in the bin where it ended
        np.add.at(ys, np.clip(np.searchsorted(edges, en[~span], side="right") - 1, 0, nbins - 1), tok[~span] / width)
        out[int(pid)] = ys
    return edges, out
