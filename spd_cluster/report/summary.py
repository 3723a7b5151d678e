"""The report's figures as (section, figure, value) rows: the terminal table, and the page's
summary table. Formatting only; the numbers are figures.py's."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import numpy as np
import pandas as pd

from .figures import Figures, _num


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


def _width(x: Any, k: int) -> str:
    """A proposal width; 0 says that speculation paused there."""
    v = _num(x)
    if v is None or k == 0:
        return "n/a"
    return "0 (paused)" if v == 0 else f"{v:.2f}"


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
    add("throughput", "job wall time", _f(fig.wall_s, 2, "s") + (" (approx.)" if fig.wall_approx else "")
        + (f" (actor start-up {_f(fig.actor_startup_s, 2, 's')} in it)" if fig.actor_startup_s else ""))
    if fig.audit_wall_s:
        add("throughput", "audit's share of it", _f(fig.audit_wall_s, 2, "s") + " (not in the throughputs)")
    add("throughput", "e2e throughput", _f(fig.e2e_throughput, 2, "tok/s")
        + (f" (generated tokens / {_f(fig.e2e_time, 2, 's')} of job wall time)" if fig.e2e_time else ""))
    add("throughput", "decode throughput", _f(fig.decode_throughput, 2, "tok/s")
        + (" per pair (decode tokens / decode pair-seconds)" if fig.decode_throughput is not None else ""))
    for _, p in fig.pairs.iterrows():
        add("throughput", f"pair {int(p.pair_id)} tokens/s",
            f"{_f(p.tokens_per_s, 2)} ({int(p.tokens):,} tok / {_f(p.busy_s, 1)} s busy, {int(p.shards)} shards; "
            f"decode {_f(p.decode_tokens_per_s, 2)})")
    add("acceptance", "mean accepted tokens / step", _f(fig.mean_accepted, 3))
    if fig.k:
        add("acceptance", "proposal width (proposed tokens / step)", _width(fig.proposal_width, fig.k))
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
    s = fig.shard_rows
    e = pd.to_numeric(s.get("e2e_time", pd.Series(dtype=float)), errors="coerce").dropna()
    add("shards", "e2e time min / median / max", "n/a" if e.empty else
        f"{e.min():.2f} / {e.median():.2f} / {e.max():.2f} s")
    if fig.k and len(s):
        tps = pd.to_numeric(s["tokens_per_step"], errors="coerce").dropna()
        if len(tps):
            add("shards", "tokens / step min / median / max", f"{tps.min():.2f} / {tps.median():.2f} / {tps.max():.2f}")
        w = pd.to_numeric(s["proposal_width"], errors="coerce").dropna()
        if len(w):
            add("shards", "speculation paused (width 0)", f"{int((w == 0).sum()):,} of {len(w):,} shards")
    retried = int((pd.to_numeric(s.get("attempts", pd.Series(dtype=float)), errors="coerce") > 1).sum())
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
    from .data import load_job
    from .figures import compute

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
