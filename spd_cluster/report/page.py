"""The report's last stage: the HTML page, one self-contained file that refers to the PNGs by
relative path."""

from __future__ import annotations

import html
import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pandas as pd

from .data import JobData
from .figures import Figures
from .summary import _f, _pct, _width, _x, summary_rows

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
              _img("speculation", pngs, d, "Per shard: tokens per (row, step), tokens proposed per (row, step) "
                                           "(adaptive k's width; 0: speculation paused) and the audit's speedup "
                                           "where the shard was audited"),
              _img("pairs", pngs, d, "Each shard's generated tokens spread evenly over its busy seconds on its "
                                     "pair (its own run; the audit's re-runs left out), summed per time bin"),
              _img("ttft", pngs, d, "Time to first token over every prompt that ran"),
              _img("shards", pngs, d, "Engine e2e time of each shard, coloured by the pair that ran it")]
    parts.append("</div>")

    if len(fig.pairs):
        parts.append("<h2>Pairs</h2><p>tokens/s: generated tokens / busy seconds (the audit's re-runs left out); "
                     "decode tokens/s: decode tokens / decode seconds</p>")
        parts.append(_table(["pair", "shards", "prompts", "tokens", "busy s", "tokens/s", "decode tokens/s",
                             "tokens/step", "proposed/step"],
                            [[int(p.pair_id), int(p.shards), "n/a" if pd.isna(p.prompts) else int(p.prompts),
                              int(p.tokens), _f(p.busy_s, 2), _f(p.tokens_per_s, 2), _f(p.decode_tokens_per_s, 2),
                              _f(p.tokens_per_step, 2), _width(p.proposal_width, fig.k)]
                             for _, p in fig.pairs.iterrows()],
                            num_cols=(1, 2, 3, 4, 5, 6, 7, 8)))
    s = fig.shard_rows
    if len(s):
        shown = s.head(500)
        parts.append(f"<h2>Shards</h2>{'<p>first 500 of ' + format(len(s), ',') + '</p>' if len(s) > 500 else ''}"
                     "<p>tokens/step: tokens a row emits per step; proposed/step: tokens proposed per (row, step), "
                     "0 where speculation paused; speedup: the audit's (baseline / SpD time per token) over the "
                     "shard's audited prompts</p>")
        parts.append(_table(["shard", "pair", "attempts", "tokens", "tokens/step", "proposed/step", "speedup",
                             "decode tokens/s", "e2e s", "busy s", "audit s", "start s", "end s"],
                            [[int(r.shard_id), "?" if pd.isna(r.pair_id) else int(r.pair_id),
                              "?" if pd.isna(r.attempts) else int(r.attempts), int(r.tokens), _f(r.tokens_per_step, 2),
                              _width(r.proposal_width, fig.k), _x(r.speedup), _f(r.decode_throughput, 2),
                              _f(r.e2e_time, 2), _f(r.busy_s, 2), _f(r.audit_s, 2), _f(r.start_s, 1), _f(r.end_s, 1)]
                             for r in shown.itertuples()],
                            num_cols=tuple(range(13))))
    parts.append("<h2>Settings</h2>")
    parts.append(_table(["setting", "value"], [list(r) for r in settings_rows(data)]))
    parts.append("</body></html>\n")
    return "\n".join(p for p in parts if p)

