"""`spd-cluster run CONFIG.yaml [--set key.path=value ...]` (and jobs/spd_batch.py)."""

from __future__ import annotations

import argparse
import sys


def run_main(config: str, overrides: list[str] | None = None, progress: bool = True) -> int:
    """Load, validate and run a job; print the aggregate ExecInfo and the output path.
    Exit codes: 0 done, 1 the job failed (what finished stays on disk), 2 bad config/input."""
    from ..config import ConfigError, load_config
    from ..io.dataset import DatasetError
    from ..io.results import OutputError
    from .audit import describe
    from .coordinator import JobError, run_job

    try:
        cfg = load_config(config, overrides or [])
        result = run_job(cfg, progress=progress)
    except (ConfigError, DatasetError, OutputError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except JobError as e:
        print(f"job failed: {e}", file=sys.stderr)
        print(f"partial output: {cfg.output.path}", file=sys.stderr)
        return 1
    print(result.exec_info)
    if result.audit.get("num_prompts"):
        print(describe(result.audit))
    print(f"Prompts = {result.num_prompts} (errors: {result.num_errors}); shards run = {result.shards_run}, "
          f"skipped (already written) = {result.shards_skipped}; job wall time = {result.wall_time_s:.2f} s")
    print(f"output: {result.output_path.resolve()}")
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override a config value (YAML scalar), e.g. --set cluster.num_pairs=2; repeatable")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _cmd_run(args: argparse.Namespace) -> int:
    return run_main(args.config, args.overrides, progress=not args.no_progress)


def add_cli(subparsers) -> None:
    """Register ``run CONFIG [--set k=v ...]``; it sets ``func(args) -> int``."""
    p = subparsers.add_parser("run", help="run a batch SpD job over a prompt dataset on Ray")
    p.add_argument("config", help="job config (YAML)")
    add_arguments(p)
    p.set_defaults(func=_cmd_run)
