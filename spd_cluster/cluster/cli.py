"""`spd-cluster run CONFIG.yaml [--set key.path=value ...]` (and jobs/spd_batch.py) and
`spd-cluster validate CONFIG.yaml [--set ...]`.

Exit codes of run: 0 done; 1 the job failed (what finished stays on disk); 2 bad config or
input (nothing started); 130 / 143 cancelled by SIGINT / SIGTERM (128 + the signal, as a shell
reports a process the signal ended; every written shard kept, one line says how to resume). A
second signal while the first is handled exits at once. validate: 0 all checks passed, 2 problems.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import sys
import threading

RUN_PROG = ["spd-cluster", "run"]
# jobs/spd_batch.py as run by hand; under `ray job submit` its resume line is the submit line
BATCH_PROG = ["python", "jobs/spd_batch.py", "--config"]
# Ray sets it in the environment of a `ray job submit` entrypoint (its job supervisor)
SUBMITTED_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"


def dashboard_url(timeout_s: float = 5.0) -> str | None:
    """The dashboard (jobs API) address of the cluster this process was submitted to: the GCS
    at RAY_ADDRESS keeps it. None when it cannot be read."""
    address = os.environ.get("RAY_ADDRESS")
    if not address:
        return None
    try:
        from ray._private import ray_constants
        from ray._raylet import GcsClient

        key, namespace = (x.encode() if isinstance(x, str) else x
                          for x in (ray_constants.DASHBOARD_ADDRESS, ray_constants.KV_NAMESPACE_DASHBOARD))
        url = GcsClient(address=address).internal_kv_get(key, namespace, timeout=timeout_s)
    except Exception:  # noqa: BLE001 - no Ray here, or another release's internals: the line goes without it
        return None
    if not url:
        return None
    url = url.decode() if isinstance(url, bytes) else str(url)
    return url if "://" in url else f"http://{url}"


def batch_prog(env=None, url=dashboard_url) -> list[str]:
    """How jobs/spd_batch.py was started, for its resume line: under `ray job submit` the submit
    line (the cluster's dashboard address where it can be read, the working dir as the README
    uploads it), else the script itself."""
    env = os.environ if env is None else env
    if SUBMITTED_ENV not in env:
        return list(BATCH_PROG)
    address = url()
    return ["ray", "job", "submit", *(["--address", address] if address else []), "--working-dir", ".", "--",
            *BATCH_PROG]


def resume_command(prog: list[str], config: str, overrides: list[str], overwrite: bool) -> str:
    """The command that runs this job again and resumes it: the same config and overrides, less
    any ``output.overwrite=true`` (which would start over), plus ``output.overwrite=false`` if the
    config file itself sets it."""
    keep = [o for o in overrides if o.partition("=")[0].strip() != "output.overwrite"]
    if overwrite:
        keep.append("output.overwrite=false")
    return shlex.join([*prog, config, *[x for o in keep for x in ("--set", o)]])


def _handle_signals():
    """SIGINT and SIGTERM raise JobCancelled in the main thread (once); returns the restorer."""
    from .errors import JobCancelled

    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    seen = []

    def handler(signum, frame):
        if seen:  # a second signal: stop now, whatever is left to write
            print(f"\n{signal.Signals(signum).name} again: exiting now; `spd-cluster status` may report the job "
                  "interrupted", file=sys.stderr)
            os._exit(128 + signum)
        seen.append(signum)
        JobCancelled.received = signum
        if not JobCancelled.holding:  # held: the driver is writing the job's last records, then ends
            raise JobCancelled(signum)

    JobCancelled.received = None
    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    return lambda: [signal.signal(s, h) for s, h in old.items()]


def run_main(config: str, overrides: list[str] | None = None, progress: bool = True,
             prog: list[str] | None = None) -> int:
    """Load, validate and run a job; print the aggregate ExecInfo and the output path.
    ``prog``: how this command is invoked, for the resume line (default ``spd-cluster run``)."""
    overrides = overrides or []
    restore = _handle_signals()
    cfg = None
    try:
        from ..config import ConfigError, load_config

        try:
            cfg = load_config(config, overrides)  # a bad config is told before anything heavy loads
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        from ..io.dataset import DatasetError
        from ..io.results import OutputError
        from .audit import describe
        from .coordinator import JobError, run_job

        try:
            cmd = resume_command(prog or RUN_PROG, config, overrides, cfg.output.overwrite)
            result = run_job(cfg, progress=progress, command=cmd)
        except (ConfigError, DatasetError, OutputError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        except JobError as e:
            print(f"job failed: {e}", file=sys.stderr)
            print(f"partial output: {cfg.output.path}", file=sys.stderr)
            return 1
    except KeyboardInterrupt as e:
        return _cancelled(e, cfg, prog or RUN_PROG, config, overrides)
    finally:
        restore()
    print(result.exec_info)
    if result.audit.get("num_prompts"):
        print(describe(result.audit))
    print(f"Prompts = {result.num_prompts} (errors: {result.num_errors}); shards run = {result.shards_run}, "
          f"skipped (already written) = {result.shards_skipped}; job wall time = {result.wall_time_s:.2f} s")
    out = result.output_path
    print(f"output: {out.path if out.local else out}")
    return 0


def _cancelled(e: KeyboardInterrupt, cfg, prog: list[str], config: str, overrides: list[str]) -> int:
    """The one line a cancelled job prints; the exit code 128 + the signal."""
    from .errors import JobCancelled

    signum = JobCancelled.signal_of(e)
    cmd = resume_command(prog, config, overrides, bool(cfg and cfg.output.overwrite))
    done = ""
    if cfg is not None:
        from ..status import read_job

        job = read_job(cfg.output.path) or {}
        if job.get("status") == "cancelled":  # the counts of the files there, as status and the report show them
            rows = (job.get("dataset") or {}).get("num_rows")
            prompts = f" ({job['prompts_done']} of {rows} prompts)" if "prompts_done" in job else ""
            done = f"{job.get('shards_done', 0)} of {job.get('num_shards')} shards{prompts} written to {cfg.output.path}; "
    print(f"\ncancelled ({signal.Signals(signum).name}): {done}resume with: {cmd}", file=sys.stderr)
    return 128 + signum


def validate_main(config: str, overrides: list[str] | None = None) -> int:
    """Print every check of the job (as `run` makes them first); 0 when all pass, 2 otherwise."""
    from ..config import ConfigError, load_config

    try:
        cfg = load_config(config, overrides or [])
    except ConfigError as e:
        print(f"  PROBLEM  config     {e}")
        print("1 problem")
        return 2
    from .preflight import preflight

    c = cfg.cluster
    print(f"  ok       config     {config}: {cfg.name}, mode {cfg.mode}, {c.num_pairs} pair(s), "
          f"max_error_fraction {cfg.max_error_fraction}")
    pf = preflight(cfg, for_run=False)
    for ch in pf.checks:
        print(f"  {'ok     ' if ch.ok else 'PROBLEM'}  {ch.name:<10} {ch.detail}")
    n = len(pf.problems)
    print(f"{n} problem{'s' if n != 1 else ''}" if n else "all checks passed (no weights loaded, nothing started)")
    return 2 if n else 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override a config value (YAML scalar), e.g. --set cluster.num_pairs=2; repeatable")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--verbose", action=_Verbose, help="log at INFO (ours and Ray's), with Ray's own start-up notices")


class _Verbose(argparse.Action):
    """``--verbose``, applied as it is parsed (``spd-cluster run`` and jobs/spd_batch.py alike)."""

    def __init__(self, option_strings, dest, **kw):
        super().__init__(option_strings, dest, nargs=0, default=False, **kw)

    def __call__(self, parser, namespace, values, option_string=None):
        from .runtime import set_verbose

        setattr(namespace, self.dest, True)
        set_verbose(True)


def _cmd_run(args: argparse.Namespace) -> int:
    return run_main(args.config, args.overrides, progress=not args.no_progress)


def _cmd_validate(args: argparse.Namespace) -> int:
    return validate_main(args.config, args.overrides)


HELP = {"run": "run a batch SpD job over a prompt dataset on Ray",
        "validate": "check a job (config, dataset, models, output, Ray resources) without running it"}


def add_cli(subparsers) -> None:
    """Register ``run CONFIG [--set k=v ...]`` and ``validate CONFIG [--set k=v ...]``; each sets
    ``func(args) -> int``."""
    p = subparsers.add_parser("run", help=HELP["run"])
    p.add_argument("config", help="job config (YAML)")
    add_arguments(p)
    p.set_defaults(func=_cmd_run)
    v = subparsers.add_parser("validate", help=HELP["validate"],
                              description="Every check `run` makes before it starts, printed; loads no weights. "
                                          "Exit 0: all passed; 2: problems.")
    v.add_argument("config", help="job config (YAML)")
    v.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override a config value, as for run")
    v.set_defaults(func=_cmd_validate)
