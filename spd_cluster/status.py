"""`spd-cluster status OUT [--json]`: where a job stands, read from its output alone (job.json and
the shard files' metadata), for a job that runs now or one that has ended.

States: running, completed, failed, cancelled (SIGINT / SIGTERM), and interrupted: job.json
says running but its driver is gone (SIGKILL, a lost node, a reboot), so nothing will finish it;
a re-run of the same command resumes it.

How a gone driver is told from a running one. The driver records who it is in job.json
(``driver``: host, pid, the process's start time, the boot id and pid namespace) and refreshes
``heartbeat_at`` (epoch seconds) every HEARTBEAT_S from a thread of its own. The heartbeat is the
signal that works everywhere: from any machine that can read OUT (a `ray job submit` driver runs
on the head node, not where you are), through containers, and it also catches a driver that is
stopped or hung. Its cost is delay: a dead driver looks alive until the heartbeat is STALE_S old.
So where the driver's process can be seen (same boot, same pid namespace) its pid decides at
once, the start time guarding against a reused pid; a pid alone would be wrong across machines
and after reuse, a heartbeat alone slow and exposed to clock skew between hosts.

Throughputs are engine/reduce.py's, over the shard records written so far and the job's clock in
job.json (each run's wall_s and actor_startup_s; an ended job's wall_time_s): e2e, generated
tokens / the job wall time less the audit's share of it, as exec_info.parquet, the CLI summary
and the report have it; decode, per pair.

Only the standard library (and pyarrow, for the shard files) is imported: no torch, no Ray.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Optional

HEARTBEAT_S = 5.0  # the driver rewrites job.json's heartbeat_at this often
STALE_S = 60.0  # a heartbeat older than this (seen from another host) means the driver is gone


# -- the driver's identity -------------------------------------------------------------------

def _read(path: str) -> Optional[str]:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


def _pid_ns() -> Optional[str]:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def _start_time(pid: int) -> Optional[float]:
    """When process ``pid`` started (epoch seconds, 0.01 s), or None if there is no such process."""
    try:
        import psutil

        return round(psutil.Process(pid).create_time(), 2)
    except ImportError:  # pragma: no cover - psutil comes with ray[default]
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        return 0.0
    except Exception:  # noqa: BLE001 - NoSuchProcess, ZombieProcess, AccessDenied
        return None


def driver_record() -> dict:
    """Who the driver of this process is, as job.json keeps it."""
    pid = os.getpid()
    return {"host": socket.gethostname(), "pid": pid, "start_time": _start_time(pid),
            "boot_id": _read("/proc/sys/kernel/random/boot_id"), "pid_ns": _pid_ns()}


def driver_gone(job: dict, now: Optional[float] = None) -> Optional[str]:
    """Why the driver job.json names is gone (a sentence), or None while it may still run."""
    d = job.get("driver") or {}
    now = time.time() if now is None else now
    same_machine = (d.get("host") == socket.gethostname() and d.get("boot_id") == _read("/proc/sys/kernel/random/boot_id")
                    and d.get("pid_ns") == _pid_ns())
    if same_machine and d.get("pid"):
        started = _start_time(int(d["pid"]))
        if started is None:
            return f"its driver (pid {d['pid']} on {d['host']}) is gone"
        if d.get("start_time") and started and abs(started - float(d["start_time"])) > 1.0:
            return f"its driver (pid {d['pid']} on {d['host']}) is gone (the pid now belongs to another process)"
        return None
    beat = job.get("heartbeat_at")
    if beat is None:
        return None  # written by a release without heartbeats: trust the recorded status
    age = now - float(beat)
    if age > STALE_S:
        return f"no heartbeat from its driver (pid {d.get('pid')} on {d.get('host')}) for {age:.0f} s"
    return None


# -- reading a job ---------------------------------------------------------------------------

def read_job(out: str | Path) -> Optional[dict]:
    """OUT/job.json (a local path or a URI), or None."""
    from .io import results as rio

    try:
        return rio.read_job_json(out)
    except ValueError:  # a URI pyarrow cannot reach
        return None


def job_status(out: str | Path, now: Optional[float] = None) -> dict:
    """Where the job in OUT stands. Raises FileNotFoundError when OUT holds no job."""
    from .io.fs import location

    out = location(out)
    job = read_job(out)
    if job is None:
        raise FileNotFoundError(f"{out}: no job.json (not a job's output, or the job never started)")
    now = time.time() if now is None else now
    num_shards = job.get("num_shards")
    from .io.results import load_records

    recs = {k: r for k, r in load_records(out)[0].items() if num_shards is None or k < num_shards}
    state, why = job.get("status", "unknown"), None
    if state == "running":
        why = driver_gone(job, now)
        if why:
            state = "interrupted"
    runs = job.get("runs") or [{}]
    run = runs[-1]
    prompts = sum(r.get("num_prompts", 0) for r in recs.values())
    total = (job.get("dataset") or {}).get("num_rows")
    from .engine.reduce import job_clock, reduce_records

    wall, startup = job_clock(job)
    wall = wall or 0.0
    fig = reduce_records(recs.values(), wall, actor_startup_s=startup)
    tokens = fig.metrics.num_generated_tokens
    eta = None
    if state == "running" and total is not None and run.get("wall_s") and run.get("prompts_run"):
        eta = (total - prompts) / (run["prompts_run"] / run["wall_s"])
    cfg = job.get("config") or {}
    return {
        "output": out.path if out.local else str(out), "name": job.get("name"), "state": state, "why": why,
        "error": job.get("error") if state in ("failed", "cancelled") else None,
        "shards_done": len(recs), "shards_total": num_shards, "prompts_done": prompts, "prompts_total": total,
        "errors": sum(r.get("num_errors", 0) for r in recs.values()),
        "max_error_fraction": cfg.get("max_error_fraction"),
        "tokens": tokens, "wall_time_s": wall, "actor_startup_s": startup,
        "audit_wall_time_s": fig.audit_wall_time_s, "e2e_time_s": fig.e2e_time,
        "tokens_per_s": fig.metrics.e2e_throughput if fig.e2e_time > 0 and tokens else None,
        "decode_tokens_per_s": fig.metrics.decode_throughput if fig.metrics.decode_time > 0 else None,
        "eta_s": eta, "runs": len(job.get("runs") or []), "started_at": job.get("started_at"),
        "ended_at": job.get("ended_at"), "driver": job.get("driver"), "heartbeat_at": job.get("heartbeat_at"),
        "resume": run.get("command") if state in ("failed", "cancelled", "interrupted") else None,
    }


def _dur(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def format_status(st: dict) -> str:
    state = st["state"] + (f" ({st['why']})" if st["why"] else "")
    if st["state"] == "running" and st.get("driver"):
        d = st["driver"]
        state += f" (driver pid {d.get('pid')} on {d.get('host')})"
    rows = st["prompts_total"]
    frac = f"{st['errors'] / rows:.1%} of {rows} rows; " if rows else ""
    lines = [f"job      {st['name']}: {state}",
             f"shards   {st['shards_done']} / {st['shards_total'] if st['shards_total'] is not None else '?'}",
             f"prompts  {st['prompts_done']} / {st['prompts_total'] if st['prompts_total'] is not None else '?'}",
             f"errors   {st['errors']} ({frac}max_error_fraction {st['max_error_fraction']})",
             f"tokens   {st['tokens']:,}" + (f", {st['tokens_per_s']:.1f} tok/s e2e over {_dur(st['e2e_time_s'])} "
                                             f"of wall time in {st['runs']} run(s)" if st["tokens_per_s"] else "")
             + (f"; decode {st['decode_tokens_per_s']:.1f} tok/s per pair" if st.get("decode_tokens_per_s") else "")]
    if st.get("audit_wall_time_s"):
        lines.append(f"audit    {_dur(st['audit_wall_time_s'])} of wall time (not in the throughputs)")
    if st["eta_s"] is not None:
        lines.append(f"ETA      {_dur(st['eta_s'])}")
    if st["error"]:
        lines.append(f"error    {st['error']}")
    if st["resume"]:
        lines.append(f"resume   {st['resume']}")
    lines.append(f"output   {st['output']}")
    return "\n".join(lines)


def _cmd_status(args: argparse.Namespace) -> int:
    try:
        st = job_status(args.out)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(st, indent=1) if args.json else format_status(st))
    return 0


def add_cli(subparsers) -> None:
    """Register ``status OUT [--json]``; it sets ``func(args) -> int``."""
    p = subparsers.add_parser("status", help="where a job stands (running or ended), from its output directory")
    p.add_argument("out", metavar="OUT", help="the job's output directory")
    p.add_argument("--json", action="store_true", help="print the status as JSON")
    p.set_defaults(func=_cmd_status)
