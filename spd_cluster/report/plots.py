"""The report's third stage: the PNGs (matplotlib's Agg canvas, pyplot's backend left alone),
drawn from figures.py's numbers."""

from __future__ import annotations

import math
import os
import uuid
from pathlib import Path

import numpy as np
import pandas as pd

from .figures import Figures, pair_rates
from .summary import _f, _pct, _x

PNG = {
    "accepted": "accepted_per_step.png",
    "position": "acceptance_by_position.png",
    "speculation": "speculation_per_shard.png",
    "pairs": "tokens_per_s_per_pair.png",
    "ttft": "ttft.png",
    "shards": "shard_e2e.png",
    "audit": "audit.png",
}


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


def _plot_speculation(fig: Figures, path: Path) -> Path:
    """Per shard: tokens per step and proposal width (bars), and the audit's speedup where the
    shard was audited: where speculation paid, and where it paused (width 0)."""
    f = _new_figure()
    ax = f.add_subplot()
    s = fig.shard_rows
    tps = pd.to_numeric(s.get("tokens_per_step", pd.Series(dtype=float)), errors="coerce") if len(s) else None
    if fig.k and tps is not None and tps.notna().any():
        x = s["shard_id"].to_numpy(int)
        w = pd.to_numeric(s["proposal_width"], errors="coerce").to_numpy(float)
        bw = 0.4 if len(s) <= 200 else 0.8
        ax.bar(x - bw / 2, tps.to_numpy(float), width=bw, color="#4C72B0", label="tokens / step")
        ax.bar(x + bw / 2, w, width=bw, color="#DD8452", label="proposed tokens / step (width)")
        paused = x[w == 0]
        if len(paused):
            ax.scatter(paused + bw / 2, np.zeros(len(paused)), marker="x", color="#C44E52", zorder=3,
                       label=f"paused ({len(paused)} shards)")
        sp = pd.to_numeric(s["speedup"], errors="coerce")
        if sp.notna().any():
            ax.plot(x[sp.notna().to_numpy()], sp.dropna().to_numpy(float), "D", color="k", markersize=5,
                    label="audit speedup (x)")
        ax.axhline(1.0, color="0.5", linewidth=0.8)
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        top = np.nanmax(np.concatenate([tps.to_numpy(float), w, sp.to_numpy(float), [1.0]]))
        ax.set_ylim(0, top * 1.35)  # room for the legend above the bars
        ax.set_xlabel("shard")
        ax.set_ylabel("tokens per (row, step) / speedup")
        ax.legend(fontsize=8, ncol=2, loc="upper left")
        ax.set_title(f"Speculation per shard (k {fig.k}): tokens / step, width, audit speedup")
    else:
        _empty(ax, "no speculation in this mode" if fig.k == 0 else "no shard finished yet")
        ax.set_title("Speculation per shard")
    return _save(f, path)


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
        ax.set_xlabel("seconds since the first shard started (the audit's re-runs left out)")
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
        "speculation": _plot_speculation(fig, report_dir / PNG["speculation"]),
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


