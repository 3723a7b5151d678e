"""`spd-cluster report OUT [--html PATH]`: a job's figures as PNGs, one HTML page and one
plain-text table.

Reads only what the job wrote (README, "Output"): the Parquet files and, for the settings and
the job's clock, job.json. Nothing here imports torch or Ray, so it is quick to run beside a job.

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

One room per stage, each reading only the one before it:
  data.py      reading OUT as it is found right now (JobData)
  figures.py   the numbers (Figures), made with engine/reduce.py's rules and throughput
               definitions, the ones exec_info.parquet, the CLI summary and `status` use
  plots.py     the PNGs (matplotlib)
  summary.py   the (section, figure, value) rows: the terminal table and the page's summary
  page.py      the HTML page
  here         build_report and the `report` command (add_cli)
"""

from __future__ import annotations

import argparse
import os
import sys
import uuid
from pathlib import Path

from ..io.fs import Location, location
from .data import RESULT_COLUMNS, JobData, load_job  # noqa: F401 - the report's API
from .figures import Figures, compute, pair_rates  # noqa: F401
from .page import render_html, settings_rows  # noqa: F401
from .plots import PNG, write_pngs  # noqa: F401
from .summary import _f, _pct, _x, summary_rows, terminal_table  # noqa: F401

REPORT_DIR = "report"


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
