"""`spd-cluster report OUT [--html PATH]`: a job's figures as PNGs, one HTML page and one
plain-text table.

Reads only what the job wrote (README, "Output"): the Parquet files and, for the
settings, job.json. Nothing here imports torch or Ray, so it is quick to run beside a job.

    OUT/results/shard-NNNNN.parquet   rows (TTFT, per-prompt accepted tokens, tokens); each file's
                                      metadata also holds its shard record (the SHARDS_SCHEMA row),
                                      which is how a job still running is reported
    OUT/shards.parquet                one row per shard (written when a job ends)
    OUT/exec_info.parquet             the aggregate (written when a job ends); audit_match_rate and
                                      audit_speedup when the job ran an audit
    OUT/audit.parquet                 one row per audited prompt, when the job ran an audit
    OUT/job.json                      settings, status, times

Written: OUT/report/*.png and the page (default OUT/report.html), which refers to the PNGs by
relative path, so the page works opened from disk as long as the two stay side by side.

Where the figures come from:
  accepted tokens per step  exact, from the summed per-position counts: a step that accepted j
                            proposals counts in accepted_per_position[0..j-1] and emits j + 1
                            tokens, so #steps emitting j + 1 = A[j-1] - A[j] (A[k] = 0) and
                            #steps emitting 1 = num_row_steps - A[0]. Without shard records the
                            per-prompt means from results/ are shown instead, and labelled so.
  aggregate throughputs     exec_info.parquet when the job has ended; while it runs (or without
                            that file) the reduce rules applied to the shard records written so
                            far, with the job wall time approximated by first shard start to last
                            shard end (start = finished_at - wall_s).
  tokens/s per pair         each shard's generated tokens spread evenly over [finished_at -
                            wall_s, finished_at] (driver seconds, dispatch to result), summed per
                            time bin; the table's per-pair figure is tokens / busy seconds
                            (busy_s: wall_s less the audit's re-runs, audit_s).
  audit speedup             exec_info's audit_speedup when the job has ended, else mean baseline
                            time per token / mean SpD time per token over audit.parquet's rows.
"""

from __future__ import annotations

import argparse
import dataclasses
import html
import json
import math
import os
import sys
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional
from urllib.parse import quote

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from .engine.modes import MODES, mode as mode_of
from .io import results as rio
from .io.fs import Location, location

REPORT_DIR = "report"
RESULT_COLUMNS = ("prompt_id", "shard_id", "pair_id", "finish_reason", "num_generated_tokens", "ttft_s",
                  "num_decode_iterations", "mean_num_accepted_tokens")
PNG = {
    "accepted": "accepted_per_step.png",
    "position": "acceptance_by_position.png",
    "pairs": "tokens_per_s_per_pair.png",
    "ttft": "ttft.png",
    "shards": "shard_e2e.png",
    "audit": "audit.png",
}
_SHARD_NUMERIC = ("pair_id", "wall_s", "busy_s", "audit_s", "e2e_time", "decode_time", "num_generated_tokens", "num_decode_tokens",
                  "num_row_steps", "decode_iterations", "mean_num_accepted_tokens", "num_prompts", "num_errors",
                  "attempts")


# -- reading ---------------------------------------------------------------------------------

@dataclasses.dataclass
class JobData:
    """Everything the report reads from OUT, as found right now."""

    out: Location
    job: Optional[dict]
    results: pd.DataFrame          # RESULT_COLUMNS, one row per prompt written so far
    shards: pd.DataFrame           # one row per finished shard (shards.parquet + result-file records)
    exec_info: Optional[dict]
    audit: Optional[pd.DataFrame]
    notes: list[str]


def _read_table(loc: Location, notes: list[str]) -> Optional[pd.DataFrame]:
    if not loc.is_file():
        return None
    try:
        return pq.read_table(loc.path, filesystem=loc.fs).to_pandas()
    except (pa.ArrowException, OSError) as e:
        notes.append(f"{loc.name} unreadable ({type(e).__name__}); ignored")
        return None


def load_job(out: str | Path | Location) -> JobData:
    """Read a job's output (a directory or a URI); a job still running (some results, no
    exec_info.parquet) is fine, as is one that has written nothing yet. Shard records as a
    resume reads them (io/results.load_records); every results file for the per-prompt figures."""
    out = location(out)
    notes: list[str] = []
    job = rio.read_job_json(out)
    on_disk = rio.written_shards(out)  # one listing, for the records and the rows
    records, stale = rio.load_records(out, on_disk=on_disk)
    for loc in stale:
        notes.append(f"results/{loc.name} unreadable ({'no shard record' if loc.is_file() else 'gone'}); skipped")
    frames = []
    for loc in on_disk.values():
        if loc in stale:
            continue
        try:
            pf = pq.ParquetFile(loc.fs.open_input_file(loc.path))
            frames.append(pf.read(columns=[c for c in RESULT_COLUMNS if c in pf.schema_arrow.names]))
        except (pa.ArrowException, OSError) as e:
            notes.append(f"results/{loc.name} unreadable ({type(e).__name__}); skipped")
    results = pd.DataFrame(columns=list(RESULT_COLUMNS))
    if frames:
        try:
            results = pa.concat_tables(frames, promote_options="default").to_pandas()
        except pa.ArrowException:  # files of differing schemas: combine them in pandas
            results = pd.concat([t.to_pandas() for t in frames], ignore_index=True)
    shards = pd.DataFrame([{k: v for k, v in r.items() if k != "audit"} for r in records.values()])
    if len(shards):
        shards = shards.sort_values("shard_id", kind="stable").reset_index(drop=True)
        for c in _SHARD_NUMERIC:
            if c in shards:
                shards[c] = pd.to_numeric(shards[c], errors="coerce")
    ei = _read_table(out / "exec_info.parquet", notes)
    exec_info = ei.iloc[0].to_dict() if ei is not None and len(ei) else None
    audit = _read_table(out / "audit.parquet", notes)
    if job is None:
        notes.append("job.json not found: settings from exec_info.parquet only" if exec_info else "job.json not found")
    return JobData(out, job, results, shards, exec_info, audit, notes)


# -- the figures -------------------------------------------------------------------------------

def _num(x: Any) -> Optional[float]:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(v) else v


def _list(x: Any) -> list:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return []
    return list(x)


def _sum_lists(lists) -> list[int]:
    out: list[int] = []
    for li in lists:
        li = _list(li)
        if len(li) > len(out):
            out += [0] * (len(li) - len(out))
        for i, v in enumerate(li):
            out[i] += int(v)
    return out


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
    wall_s: Optional[float]
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
    shard_rows: pd.DataFrame         # shard_id, pair_id, e2e_time, wall_s, tokens, start_s, end_s, attempts
    pairs: pd.DataFrame              # pair_id, shards, prompts, tokens, busy_s, tokens_per_s
    audit: Optional[dict]

    @property
    def rates(self) -> list[float]:
        return [a / p if p else 0.0 for a, p in zip(self.accepted, self.proposed)]

    @property
    def partial(self) -> bool:
        return self.shards_total is not None and self.shards_done < self.shards_total


def compute(data: JobData) -> Figures:
    job, ei, sh, res = data.job, data.exec_info, data.shards, data.results
    status = str((job or {}).get("status") or ("completed" if ei else "unknown"))
    running = status == "running"
    use_ei = ei is not None and not running
    name = (job or {}).get("name") or (ei or {}).get("name") or data.out.name
    mode = _cfg(job, "mode") or (ei or {}).get("mode") or "?"
    k = _cfg(job, "spd", "num_speculative_tokens")
    if k is None and ei is not None:
        k = _num(ei.get("num_speculative_tokens"))
    proposed = _sum_lists(sh["proposed_per_position"]) if "proposed_per_position" in sh else []
    accepted = _sum_lists(sh["accepted_per_position"]) if "accepted_per_position" in sh else []
    if use_ei and ei.get("proposed_per_position") is not None:
        proposed, accepted = _sum_lists([ei["proposed_per_position"]]), _sum_lists([ei["accepted_per_position"]])
    k = int(k) if k is not None else len(proposed)
    if mode in MODES and not mode_of(mode).speculates:
        k = 0
    prompts_total = (job or {}).get("dataset", {}).get("num_rows") if job else None
    if prompts_total is None and ei is not None:
        prompts_total = _num(ei.get("num_prompts"))
    shards_total = (job or {}).get("num_shards") if job else None
    if shards_total is None and ei is not None:
        shards_total = _num(ei.get("num_shards"))

    # shards on the job's clock
    srows = pd.DataFrame({"shard_id": sh["shard_id"].astype(int)}) if len(sh) else pd.DataFrame(
        columns=["shard_id", "pair_id", "e2e_time", "wall_s", "tokens", "start_s", "end_s", "attempts"])
    if len(sh):
        srows["pair_id"] = sh.get("pair_id", pd.Series(np.nan, index=sh.index))
        srows["e2e_time"] = sh.get("e2e_time", pd.Series(np.nan, index=sh.index))
        srows["wall_s"] = sh.get("wall_s", pd.Series(np.nan, index=sh.index))
        # busy_s = wall_s less the audit's re-runs (records before it existed: wall_s)
        srows["busy_s"] = sh["busy_s"].fillna(srows["wall_s"]) if "busy_s" in sh else srows["wall_s"]
        srows["attempts"] = sh.get("attempts", pd.Series(1, index=sh.index))
        tokens = sh.get("num_generated_tokens", pd.Series(np.nan, index=sh.index))
        if len(res):
            from_rows = res.groupby("shard_id")["num_generated_tokens"].sum()
            fill = srows["shard_id"].map(from_rows)
            tokens = tokens.where(tokens.notna() & (tokens > 0), fill)
        srows["tokens"] = tokens.fillna(0)
        end = pd.to_datetime(sh.get("finished_at", pd.Series(None, index=sh.index)), utc=True, errors="coerce")
        start = end - pd.to_timedelta(srows["wall_s"].fillna(0), unit="s")
        t0 = start.min()
        srows["start_s"] = (start - t0).dt.total_seconds()
        srows["end_s"] = (end - t0).dt.total_seconds()
        # finished_at has whole seconds: a pair runs one shard at a time, so a shard starts no
        # earlier than the pair's previous shard ended
        order = srows.sort_values(["end_s"], kind="stable")
        prev_end = order.groupby(order["pair_id"].fillna(-1))["end_s"].shift()
        prev_end = prev_end.reindex(srows.index)
        later = prev_end < srows["end_s"]
        srows.loc[later, "start_s"] = np.fmax(srows.loc[later, "start_s"], prev_end[later])
    pairs = pd.DataFrame(columns=["pair_id", "shards", "prompts", "tokens", "busy_s", "tokens_per_s"])
    if len(srows) and srows["pair_id"].notna().any():
        g = srows.dropna(subset=["pair_id"]).groupby("pair_id")
        pairs = pd.DataFrame({"shards": g.size(), "tokens": g["tokens"].sum(), "busy_s": g["busy_s"].sum()})
        prompts = sh.groupby("pair_id")["num_prompts"].sum() if "num_prompts" in sh else None
        pairs["prompts"] = prompts if prompts is not None else np.nan
        pairs["tokens_per_s"] = pairs["tokens"] / pairs["busy_s"].where(pairs["busy_s"] > 0)
        pairs = pairs.reset_index()
        pairs["pair_id"] = pairs["pair_id"].astype(int)

    ran = res[res["finish_reason"] != "error"] if len(res) else res
    ttft = pd.to_numeric(ran["ttft_s"], errors="coerce").dropna().to_numpy(float) if len(ran) else np.array([])
    means = ran.loc[pd.to_numeric(ran["num_decode_iterations"], errors="coerce") > 0, "mean_num_accepted_tokens"] \
        if len(ran) else pd.Series(dtype=float)
    prompt_means = pd.to_numeric(means, errors="coerce").dropna().to_numpy(float)

    # aggregate
    tokens_total = int(srows["tokens"].sum()) if len(srows) else int(pd.to_numeric(
        res.get("num_generated_tokens", pd.Series(dtype=float)), errors="coerce").fillna(0).sum())
    row_steps = int(sh["num_row_steps"].fillna(0).sum()) if "num_row_steps" in sh else 0
    if use_ei:
        src = "exec_info.parquet"
        wall = _num(ei.get("e2e_time"))
        e2e_tps, dec_tps = _num(ei.get("e2e_throughput")), _num(ei.get("decode_throughput"))
        mean_acc, batch_ttft = _num(ei.get("mean_num_accepted_tokens")), _num(ei.get("batch_ttft"))
        tokens_total = int(_num(ei.get("num_generated_tokens")) or tokens_total)
        row_steps = int(_num(ei.get("num_row_steps")) or row_steps)
    else:
        src = f"{len(srows)} shard record(s) so far" if len(srows) else "nothing finished yet"
        wall = None
        if len(srows) and srows["end_s"].notna().any():
            wall = float(srows["end_s"].max() - srows["start_s"].min())
        e2e_tps = tokens_total / wall if wall else None
        dec_tps, mean_acc, batch_ttft = None, None, None
        if len(sh) and wall:
            busy = sh["e2e_time"].fillna(0).sum()
            dwall = wall * sh["decode_time"].fillna(0).sum() / busy if busy > 0 else 0.0
            dec_tps = float(sh["num_decode_tokens"].fillna(0).sum() / dwall) if dwall > 0 else None
        if row_steps:
            mean_acc = float((sh["mean_num_accepted_tokens"].fillna(0) * sh["num_row_steps"].fillna(0)).sum()
                             / row_steps)
        elif len(prompt_means):
            mean_acc = float(prompt_means.mean())
    step_counts: dict[int, int] = {}
    step_source = ""
    if row_steps and (len(accepted) or k == 0):
        a = list(accepted) + [0]
        step_counts = {1: row_steps - (a[0] if accepted else 0)}
        for j in range(1, len(a)):
            step_counts[j + 1] = a[j - 1] - a[j]
        step_source = "exact"
        if min(step_counts.values()) < 0:  # counts that do not nest (not this engine's): do not guess
            step_counts, step_source = {}, ""
    if not step_source and len(prompt_means):
        step_source = "per-prompt means"

    return Figures(
        name=str(name), mode=str(mode), status=status, running=running, k=k,
        prompts_total=int(prompts_total) if prompts_total is not None else None,
        prompts_done=len(res), errors=int((res["finish_reason"] == "error").sum()) if len(res) else 0,
        shards_total=int(shards_total) if shards_total is not None else None, shards_done=len(srows),
        tokens=tokens_total, wall_s=wall, e2e_throughput=e2e_tps, decode_throughput=dec_tps,
        mean_accepted=mean_acc, batch_ttft=batch_ttft, aggregate_source=src, step_counts=step_counts,
        step_source=step_source, prompt_means=prompt_means, proposed=proposed[:k] if k else [],
        accepted=accepted[:k] if k else [], ttft=ttft, shard_rows=srows, pairs=pairs,
        audit=_audit(data, use_ei),
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
    speed = base_tpt / spd_tpt if spd_tpt and base_tpt is not None else None
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


# -- the table ---------------------------------------------------------------------------------

def _f(x: Any, digits: int = 2, unit: str = "") -> str:
    v = _num(x)
    if v is None:
        return "n/a"
    s = f"{v:,.{digits}f}"
    return f"{s} {unit}".rstrip()


def _x(x: Any) -> str:
    v = _num(x)
    return "n/a" if v is None else f"{v:.2f}x"


def _pct(x: Any) -> str:
    """A share as a percentage; never rounds a share below 1 up to 100% (nor above 0 down to 0%)."""
    v = _num(x)
    if v is None:
        return "n/a"
    digits = 1
    while digits < 6 and 0 < v < 1 and round(100 * v, digits) in (0, 100):
        digits += 1
    return f"{100 * v:.{digits}f}%"


def summary_rows(fig: Figures) -> list[tuple[str, str, str]]:
    """(section, figure, value) rows: the terminal table, and the page's summary table."""
    rows: list[tuple[str, str, str]] = []
    add = lambda sec, name, val: rows.append((sec, name, val))  # noqa: E731
    of = lambda n, total: f"{n:,}" + (f" of {total:,}" if total is not None else "")  # noqa: E731
    add("job", "name / mode", f"{fig.name} / {fig.mode}")
    add("job", "status", fig.status + (" (partial)" if fig.partial else ""))
    add("job", "prompts written", of(fig.prompts_done, fig.prompts_total) + f" (errors: {fig.errors:,})")
    add("job", "shards written", of(fig.shards_done, fig.shards_total))
    add("throughput", "aggregate from", fig.aggregate_source)
    add("throughput", "generated tokens", f"{fig.tokens:,}")
    add("throughput", "job wall time", _f(fig.wall_s, 2, "s") + ("" if fig.aggregate_source.startswith("exec")
                                                                  or fig.wall_s is None else " (approx.)"))
    add("throughput", "e2e throughput", _f(fig.e2e_throughput, 2, "tok/s"))
    add("throughput", "decode throughput", _f(fig.decode_throughput, 2, "tok/s"))
    for _, p in fig.pairs.iterrows():
        add("throughput", f"pair {int(p.pair_id)} tokens/s",
            f"{_f(p.tokens_per_s, 2)} ({int(p.tokens):,} tok / {_f(p.busy_s, 1)} s busy, {int(p.shards)} shards)")
    add("acceptance", "mean accepted tokens / step", _f(fig.mean_accepted, 3))
    if fig.step_counts:
        total = sum(fig.step_counts.values())
        dist = ", ".join(f"{j}:{100 * c / total:.0f}%" for j, c in sorted(fig.step_counts.items()) if total)
        add("acceptance", "tokens per step (share of steps)", dist)
    for i, (a, p) in enumerate(zip(fig.accepted, fig.proposed)):
        add("acceptance", f"acceptance rate, position {i + 1}", f"{_pct(a / p if p else None)} ({a:,}/{p:,})")
    if fig.k == 0:
        add("acceptance", "acceptance rate by position", "n/a (no speculation in this mode)")
    t = fig.ttft
    if len(t):
        add("ttft", "mean / p50 / p90 / max",
            f"{t.mean():.3f} / {np.percentile(t, 50):.3f} / {np.percentile(t, 90):.3f} / {t.max():.3f} s")
    else:
        add("ttft", "mean / p50 / p90 / max", "n/a")
    add("ttft", "batch ttft", _f(fig.batch_ttft, 3, "s"))
    e = pd.to_numeric(fig.shard_rows.get("e2e_time", pd.Series(dtype=float)), errors="coerce").dropna()
    add("shards", "e2e time min / median / max", "n/a" if e.empty else
        f"{e.min():.2f} / {e.median():.2f} / {e.max():.2f} s")
    retried = int((pd.to_numeric(fig.shard_rows.get("attempts", pd.Series(dtype=float)), errors="coerce") > 1).sum())
    add("shards", "shards re-run after a failure", f"{retried:,}")
    a = fig.audit
    if a is None:
        add("audit", "audit", "no audit")
    else:
        n = a["n"]
        add("audit", "prompts audited", "n/a" if n is None else f"{n:,}")
        c = a["checked"]
        mm = "" if n is None else (f" ({a['matched']:,}/{c:,} identical, {c - a['matched']:,} mismatched"
                                   + (f", {n - c:,} not compared" if n > c else "") + ")")
        add("audit", "match rate", _pct(a["match_rate"]) + mm)
        add("audit", "speedup (baseline / SpD time per token)", _x(a["speedup"]))
        if a["spd_tpt"] is not None:
            add("audit", "time per token SpD / baseline", f"{1e3 * a['spd_tpt']:.2f} / {1e3 * a['base_tpt']:.2f} ms")
        add("audit", "from", a["source"])
    return rows


def terminal_table(out_dir: str | Path, *, _fig: Optional[Figures] = None) -> str:
    """The report's figures as one plain-text table."""
    fig = _fig or compute(load_job(out_dir))
    rows = summary_rows(fig)
    head = ("section", "figure", "value")
    w = [max(len(r[i]) for r in rows + [head]) for i in range(3)]
    line = "+" + "+".join("-" * (x + 2) for x in w) + "+"
    fmt = lambda r: "| " + " | ".join(c.ljust(x) for c, x in zip(r, w)) + " |"  # noqa: E731
    out = [f"spd_cluster report: {fig.name} ({out_dir})", line, fmt(head), line]
    prev = None
    for r in rows:
        if prev is not None and r[0] != prev:
            out.append(line)
        out.append(fmt((r[0] if r[0] != prev else "",) + r[1:]))
        prev = r[0]
    out.append(line)
    return "\n".join(out)


# -- the PNGs ----------------------------------------------------------------------------------

def _new_figure(w: float = 7.0, h: float = 3.8):
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # Agg, without touching pyplot's backend
    from matplotlib.figure import Figure

    f = Figure(figsize=(w, h), dpi=110, layout="constrained")
    FigureCanvasAgg(f)
    return f


def _save(f, path: Path) -> Path:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp.png")
    try:
        f.savefig(tmp, format="png")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _empty(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="0.4")
    ax.set_xticks([])
    ax.set_yticks([])


def _pair_colors(pair_ids) -> dict:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return {p: cmap(i % 10) for i, p in enumerate(sorted(set(pair_ids)))}


def _plot_accepted(fig: Figures, path: Path) -> Path:
    f = _new_figure()
    ax = f.add_subplot()
    if fig.step_source == "exact":
        xs = sorted(fig.step_counts)
        total = sum(fig.step_counts.values())
        ys = [fig.step_counts[x] for x in xs]
        bars = ax.bar(xs, ys, color="#4C72B0")
        for b, y in zip(bars, ys):
            ax.annotate(f"{100 * y / total:.0f}%" if total else "", (b.get_x() + b.get_width() / 2, y),
                        ha="center", va="bottom", fontsize=8)
        ax.set_xticks(xs)
        ax.set_xlabel("tokens emitted in one step (accepted proposals + the target's own token)")
        ax.set_ylabel("(row, step) pairs")
        ax.set_title(f"Accepted tokens per step: {total:,} steps, mean {_f(fig.mean_accepted, 2)}")
    elif fig.step_source:
        hi = max(fig.k + 1, math.ceil(fig.prompt_means.max()))
        ax.hist(fig.prompt_means, bins=np.linspace(1, hi, 4 * (hi - 1) + 1) if hi > 1 else 10, color="#4C72B0")
        ax.set_xlabel("mean tokens per step, per prompt (per-step counts not in this output)")
        ax.set_ylabel("prompts")
        ax.set_title(f"Accepted tokens per step (per-prompt means, {len(fig.prompt_means):,} prompts)")
    else:
        _empty(ax, "no decode steps written yet")
        ax.set_title("Accepted tokens per step")
    return _save(f, path)


def _plot_positions(fig: Figures, path: Path) -> Path:
    f = _new_figure()
    ax = f.add_subplot()
    if fig.proposed and any(fig.proposed):
        xs = np.arange(1, len(fig.proposed) + 1)
        bars = ax.bar(xs, fig.rates, color="#55A868")
        for b, a, p in zip(bars, fig.accepted, fig.proposed):
            ax.annotate(f"{a:,}/{p:,}", (b.get_x() + b.get_width() / 2, b.get_height()), ha="center",
                        va="bottom", fontsize=8)
        ax.set_xticks(xs)
        ax.set_ylim(0, max(1.0, max(fig.rates) * 1.15))
        ax.set_xlabel("speculative position")
        ax.set_ylabel("accepted / proposed")
        ax.set_title("Acceptance rate by speculative position")
    else:
        _empty(ax, "no speculation in this mode" if fig.k == 0 else "no proposals written yet")
        ax.set_title("Acceptance rate by speculative position")
    return _save(f, path)


def pair_rates(shard_rows: pd.DataFrame, nbins: int = 120) -> tuple[np.ndarray, dict[int, np.ndarray]]:
    """Tokens/s of each pair over the job's clock: each shard's tokens spread evenly over the
    seconds it ran (start = end - wall_s), summed per time bin. Returns bin edges and, per
    pair, the rate in each bin."""
    s = shard_rows.dropna(subset=["start_s", "end_s", "pair_id"]) if len(shard_rows) else shard_rows
    if not len(s):
        return np.array([]), {}
    lo, hi = float(s["start_s"].min()), float(s["end_s"].max())
    edges = np.linspace(lo, hi if hi > lo else lo + 1.0, nbins + 1)
    width = edges[1] - edges[0]
    out = {}
    for pid, g in s.groupby(s["pair_id"].astype(int)):
        st, en = g["start_s"].to_numpy(float), g["end_s"].to_numpy(float)
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


def _plot_pairs(fig: Figures, path: Path) -> Path:
    f = _new_figure()
    ax = f.add_subplot()
    edges, series = pair_rates(fig.shard_rows)
    if series:
        colors = _pair_colors(series)
        for pid, ys in series.items():
            ax.stairs(ys, edges, color=colors[pid], linewidth=1.4, label=f"pair {pid}")
        if len(series) > 1:
            ax.stairs(sum(series.values()), edges, color="k", linestyle="--", linewidth=1, label="all pairs")
        ax.set_ylim(bottom=0)
        ax.set_xlabel("seconds since the first shard started")
        ax.set_ylabel("generated tokens / s")
        ax.legend(fontsize=8, ncol=min(5, len(series) + 1))
        ax.set_title("Tokens/s per pair over time")
    else:
        _empty(ax, "no shard finished yet")
        ax.set_title("Tokens/s per pair over time")
    return _save(f, path)


def _plot_ttft(fig: Figures, path: Path) -> Path:
    f = _new_figure()
    ax = f.add_subplot()
    t = fig.ttft
    if len(t):
        ax.hist(t, bins=min(50, max(5, int(np.sqrt(len(t))) * 2)), color="#8172B2")
        for q, ls in ((50, "--"), (90, ":")):
            v = np.percentile(t, q)
            ax.axvline(v, color="k", linestyle=ls, linewidth=1, label=f"p{q} {v:.3f} s")
        ax.axvline(t.mean(), color="#C44E52", linewidth=1, label=f"mean {t.mean():.3f} s")
        ax.legend(fontsize=8)
        ax.set_xlabel("time to first token (s): prefill start to first token")
        ax.set_ylabel("prompts")
        ax.set_title(f"TTFT distribution ({len(t):,} prompts)")
    else:
        _empty(ax, "no prompt finished yet")
        ax.set_title("TTFT distribution")
    return _save(f, path)


def _plot_shards(fig: Figures, path: Path) -> Path:
    f = _new_figure()
    ax = f.add_subplot()
    s = fig.shard_rows
    e = pd.to_numeric(s.get("e2e_time", pd.Series(dtype=float)), errors="coerce") if len(s) else pd.Series(dtype=float)
    if e.notna().any():
        pid = s["pair_id"].fillna(-1).astype(int)
        colors = _pair_colors(pid)
        if len(s) <= 200:
            ax.bar(s["shard_id"], e, color=[colors[p] for p in pid], width=0.8)
        else:
            ax.scatter(s["shard_id"], e, c=[colors[p] for p in pid], s=6)
        from matplotlib.patches import Patch

        ax.legend(handles=[Patch(color=c, label=f"pair {p}" if p >= 0 else "pair ?") for p, c in colors.items()],
                  fontsize=8, ncol=min(4, len(colors)))
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("shard")
        ax.set_ylabel("e2e time (s)")
        ax.set_title(f"Per-shard e2e time ({int(e.notna().sum()):,} shards; colour = pair)")
    else:
        _empty(ax, "no shard finished yet")
        ax.set_title("Per-shard e2e time")
    return _save(f, path)


def _plot_audit(fig: Figures, path: Path) -> Path:
    a = fig.audit
    f = _new_figure(8.0, 3.6)
    ax1, ax2 = f.subplots(1, 2, width_ratios=[2, 1])
    pp = a.get("per_prompt")
    if pp is not None and len(pp):
        bins = min(40, max(5, int(np.sqrt(len(pp))) * 2))
        edges = np.histogram_bin_edges(pp["speedup"], bins=bins)
        ax1.hist([pp.loc[pp["match"], "speedup"], pp.loc[~pp["match"], "speedup"]], bins=edges, stacked=True,
                 color=["#55A868", "#C44E52"], label=["identical", "mismatch"])
        if a["speedup"] is not None:
            ax1.axvline(a["speedup"], color="k", linestyle="--", linewidth=1, label=f"job {a['speedup']:.2f}x")
        ax1.axvline(1.0, color="0.5", linewidth=0.8)
        ax1.legend(fontsize=8)
        ax1.set_xlabel("speedup per audited prompt (baseline / SpD time per token)")
        ax1.set_ylabel("prompts")
        ax1.set_title(f"Audit speedup: {_x(a['speedup'])}")
    else:
        _empty(ax1, f"speedup {_x(a['speedup'])}" if a["speedup"] is not None else "no timed audit rows")
        ax1.set_title("Audit speedup")
    if a["checked"]:
        mm = a["checked"] - a["matched"]
        bars = ax2.bar(["identical", "mismatch"], [a["matched"], mm], color=["#55A868", "#C44E52"])
        for b, y in zip(bars, [a["matched"], mm]):
            ax2.annotate(f"{y:,}", (b.get_x() + b.get_width() / 2, y), ha="center", va="bottom", fontsize=8)
        ax2.set_ylabel("audited prompts")
    else:
        _empty(ax2, _pct(a["match_rate"]))
    ax2.set_title(f"Match rate {_pct(a['match_rate'])}")
    return _save(f, path)


def write_pngs(fig: Figures, report_dir: Path) -> dict[str, Path]:
    """Every PNG this report has (audit.png only with an audit); stale ones of ours removed."""
    report_dir.mkdir(parents=True, exist_ok=True)
    made = {
        "accepted": _plot_accepted(fig, report_dir / PNG["accepted"]),
        "position": _plot_positions(fig, report_dir / PNG["position"]),
        "pairs": _plot_pairs(fig, report_dir / PNG["pairs"]),
        "ttft": _plot_ttft(fig, report_dir / PNG["ttft"]),
        "shards": _plot_shards(fig, report_dir / PNG["shards"]),
    }
    if fig.audit is not None:
        made["audit"] = _plot_audit(fig, report_dir / PNG["audit"])
    for key, name in PNG.items():
        if key not in made:
            (report_dir / name).unlink(missing_ok=True)
    return made


# -- the page ----------------------------------------------------------------------------------

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1100px;
  color:#222;padding:0 1em}
h1{font-size:1.5em;margin-bottom:.2em}
h2{font-size:1.15em;margin-top:1.8em;border-bottom:1px solid #ddd;padding-bottom:.2em}
.meta{color:#666} .banner{background:#fff4d6;border:1px solid #e8c96a;padding:.5em .8em;margin:1em 0}
.bad{color:#b00020;font-weight:600} .good{color:#1b7a3a;font-weight:600}
table{border-collapse:collapse;margin:.5em 0}
td,th{border:1px solid #ddd;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#f4f4f4} td.num{text-align:right;font-variant-numeric:tabular-nums}
.grid{display:grid;grid-template-columns:repeat(auto-fit,minmax(460px,1fr));gap:1em}
figure{margin:0} figure img{max-width:100%;border:1px solid #eee} figcaption{color:#555;font-size:.9em}
code{background:#f4f4f4;padding:0 3px}
"""


def _table(header: list[str], rows: list[list[Any]], num_cols: tuple[int, ...] = ()) -> str:
    e = html.escape
    th = "".join(f"<th>{e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td{' class=num' if i in num_cols else ''}>{e(str(c))}</td>"
                                    for i, c in enumerate(r)) + "</tr>" for r in rows)
    return f"<table><tr>{th}</tr>{body}</table>"


def _flatten(d: Any, prefix: str = "") -> list[tuple[str, str]]:
    if isinstance(d, dict):
        out = []
        for k, v in d.items():
            out += _flatten(v, f"{prefix}.{k}" if prefix else str(k))
        return out
    if isinstance(d, list) and d and all(isinstance(x, dict) for x in d):
        return [(f"{prefix}[{i}]", json.dumps(x, default=str)) for i, x in enumerate(d)]
    return [(prefix, "null" if d is None else json.dumps(d) if isinstance(d, list) else str(d))]


def settings_rows(data: JobData) -> list[tuple[str, str]]:
    """The job's settings: job.json (config, dataset, status, times, versions); without it,
    exec_info.parquet's settings columns."""
    job = data.job
    if job:
        rows = _flatten(job.get("config", {}))
        for key in ("status", "started_at", "ended_at", "wall_time_s", "num_shards", "shards_done", "error",
                    "config_hash"):
            if key in job:
                rows.append((key, "null" if job[key] is None else str(job[key])))
        rows += _flatten(job.get("dataset", {}), "dataset")
        rows += _flatten(job.get("versions", {}), "versions")
        rows.append(("runs", str(len(job.get("runs", [])))))
        return rows
    ei = data.exec_info or {}
    keys = ("name", "mode", "target_model_name", "draft_model_name", "num_speculative_tokens", "prefill_seq_len",
            "ctx_len", "full_batch_size", "prefill_bsz", "batch_size", "num_prompts", "num_shards", "num_pairs")
    return [(k, str(ei[k])) for k in keys if k in ei]


def _img(key: str, pngs: dict[str, Path], html_dir: Path, caption: str) -> str:
    if key not in pngs:
        return ""
    rel = Path(os.path.relpath(pngs[key], html_dir)).as_posix()
    return (f'<figure><img src="{html.escape(quote(rel))}" alt="{html.escape(caption)}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def render_html(data: JobData, fig: Figures, pngs: dict[str, Path], html_path: Path) -> str:
    e = html.escape
    d = html_path.parent
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    parts = [f"<!doctype html><html lang=en><head><meta charset=utf-8>"
             f"<meta name=viewport content='width=device-width,initial-scale=1'>"
             f"<title>spd_cluster report: {e(fig.name)}</title><style>{_CSS}</style></head><body>",
             f"<h1>spd_cluster report: {e(fig.name)}</h1>",
             f"<div class=meta>output <code>{e(data.out.path if data.out.local else str(data.out))}</code> · mode <b>{e(fig.mode)}</b> · "
             f"status <b>{e(fig.status)}</b> · report made {e(now)}</div>"]
    if fig.partial or fig.running:
        parts.append(f"<div class=banner>Partial: {fig.shards_done:,} of "
                     f"{fig.shards_total if fig.shards_total is not None else '?'} shards written "
                     f"({fig.prompts_done:,} prompts). Aggregates from {e(fig.aggregate_source)}; "
                     f"run the report again for newer figures.</div>")
    for n in data.notes:
        parts.append(f"<div class=banner>{e(n)}</div>")

    a = fig.audit
    parts.append("<h2>Audit: losslessness and speedup</h2>")
    if a is None:
        parts.append("<p><b>no audit</b>: this job wrote no <code>audit.parquet</code> "
                     "(audit off, or not reached yet).</p>")
    else:
        cls = "good" if a["match_rate"] == 1.0 else "bad"
        n = "?" if a["n"] is None else f"{a['n']:,}"
        parts.append(f"<p>Match rate <span class={cls}>{_pct(a['match_rate'])}</span> of {n} audited prompts "
                     f"token-identical to the baseline; speedup <b>{_x(a['speedup'])}</b> "
                     f"(baseline time per token / SpD time per token). From {e(a['source'])}.</p>")
        parts.append(_img("audit", pngs, d, "Per-prompt speedup (stacked by match) and identical vs mismatched"))
        mm = a["mismatches"]
        if len(mm):
            shown = mm.head(100)
            parts.append(f"<p class=bad>{len(mm):,} mismatched prompt(s)"
                         f"{' (first 100)' if len(mm) > 100 else ''}:</p>")
            parts.append(_table(list(shown.columns), shown.astype(object).where(shown.notna(), "null").values.tolist()))

    parts.append("<h2>Summary</h2>")
    parts.append(_table(["section", "figure", "value"], [list(r) for r in summary_rows(fig)]))

    parts.append("<h2>Figures</h2><div class=grid>")
    step_cap = ("Histogram of tokens emitted per (row, step): exact, from the per-position accepted counts"
                if fig.step_source == "exact" else
                "Histogram of each prompt's mean tokens per step (per-step counts not in this output)")
    parts += [_img("accepted", pngs, d, step_cap),
              _img("position", pngs, d, "Of the steps that proposed a token at position i, the share accepted"),
              _img("pairs", pngs, d, "Each shard's generated tokens spread evenly over the seconds it ran on its "
                                     "pair (driver wall time, dispatch to result), summed per time bin"),
              _img("ttft", pngs, d, "Time to first token over every prompt that ran"),
              _img("shards", pngs, d, "Engine e2e time of each shard, coloured by the pair that ran it")]
    parts.append("</div>")

    if len(fig.pairs):
        parts.append("<h2>Pairs</h2>")
        parts.append(_table(["pair", "shards", "prompts", "tokens", "busy s", "tokens/s"],
                            [[int(p.pair_id), int(p.shards), "n/a" if pd.isna(p.prompts) else int(p.prompts),
                              int(p.tokens), _f(p.busy_s, 2), _f(p.tokens_per_s, 2)] for _, p in fig.pairs.iterrows()],
                            num_cols=(1, 2, 3, 4, 5)))
    s = fig.shard_rows
    if len(s):
        shown = s.head(500)
        parts.append(f"<h2>Shards</h2>{'<p>first 500 of ' + format(len(s), ',') + '</p>' if len(s) > 500 else ''}")
        parts.append(_table(["shard", "pair", "attempts", "tokens", "e2e s", "wall s", "start s", "end s"],
                            [[int(r.shard_id), "?" if pd.isna(r.pair_id) else int(r.pair_id),
                              "?" if pd.isna(r.attempts) else int(r.attempts), int(r.tokens), _f(r.e2e_time, 2),
                              _f(r.wall_s, 2), _f(r.start_s, 1), _f(r.end_s, 1)] for r in shown.itertuples()],
                            num_cols=(0, 1, 2, 3, 4, 5, 6, 7)))
    parts.append("<h2>Settings</h2>")
    parts.append(_table(["setting", "value"], [list(r) for r in settings_rows(data)]))
    parts.append("</body></html>\n")
    return "\n".join(p for p in parts if p)


def build_report(out_dir: str | Path, html_path: str | Path | None = None) -> Path:
    """Write the PNGs and the page; return the page's path. A local output gets OUT/report/*.png
    and OUT/report.html; one on object storage is read, not written: ./<output name>-report/.
    ``html_path`` puts the page elsewhere."""
    return _build(out_dir, html_path)[0]


def is_job_output(out: Location) -> bool:
    return any((out / n).exists() for n in ("job.json", "results", "exec_info.parquet"))


def _build(out_dir: str | Path, html_path: str | Path | None) -> tuple[Path, JobData, Figures]:
    out = location(out_dir)
    if not is_job_output(out):
        raise FileNotFoundError(f"no job output at {out}")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ImportError("the report's PNGs need matplotlib: pip install -e '.[report]'") from None
    data = load_job(out)
    fig = compute(data)
    home = Path(out.path) if out.local else Path.cwd() / f"{out.name}-report"
    page = Path(html_path) if html_path else home / "report.html"
    page.parent.mkdir(parents=True, exist_ok=True)
    pngs = write_pngs(fig, home / REPORT_DIR)
    text = render_html(data, fig, pngs, page)
    tmp = page.with_name(f".{page.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, page)
    finally:
        tmp.unlink(missing_ok=True)
    return page, data, fig


# -- CLI ---------------------------------------------------------------------------------------

def _cmd_report(args: argparse.Namespace) -> int:
    try:
        out = location(args.out)
        found = is_job_output(out)
    except (ValueError, OSError) as e:
        print(f"error: {args.out}: {e}", file=sys.stderr)
        return 2
    if not found:
        print(f"error: {out} is not a job output (no job.json, results/ or exec_info.parquet)", file=sys.stderr)
        return 2
    try:
        page, data, fig = _build(out, args.html)
    except ImportError as e:  # no matplotlib: the table still prints
        print(terminal_table(out))
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(terminal_table(out, _fig=fig))
    for n in data.notes:
        print(f"note: {n}")
    print(f"report: {page.resolve()}")
    return 0


def add_cli(subparsers) -> None:
    """Register ``report OUT [--html PATH]``; it sets ``func(args) -> int``."""
    p = subparsers.add_parser("report", help="figures of a job's output (finished or running): PNGs, HTML, table")
    p.add_argument("out", metavar="OUT", help="the job's output: a directory or a URI (s3://bucket/prefix, ...)")
    p.add_argument("--html", metavar="PATH", default=None,
                   help="where to write the page (default OUT/report.html; ./NAME-report/ for an output on a URI)")
    p.set_defaults(func=_cmd_report)
