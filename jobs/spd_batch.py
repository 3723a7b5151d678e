"""Ray job entrypoint: the same as `spd-cluster run`, for

    ray job submit --address http://127.0.0.1:$DASH --working-dir . -- \
        python jobs/spd_batch.py --config configs/demo.yaml [--set key.path=value ...]

(a head of one's own on free ports, $DASH its dashboard's: the README's recipe)

Under `ray job submit` the driver joins the cluster that runs it (RAY_ADDRESS); run by hand
without one it starts a local Ray on 127.0.0.1. `ray job stop` sends SIGTERM: the job ends as
cancelled (exit 143), every written shard kept; submitting the same command again resumes it (the
line it prints, and `spd-cluster status` shows, is that `ray job submit` line).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the working dir, when not pip-installed

from spd_cluster.cluster.cli import add_arguments, batch_prog, run_main  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Run an spd_cluster batch job (Ray job entrypoint).")
    p.add_argument("--config", required=True, help="job config (YAML)")
    add_arguments(p)
    args = p.parse_args(argv)
    # a cancelled job's resume line: how it was started (`ray job submit ... -- python jobs/spd_batch.py`
    # under a submit, this script alone by hand)
    return run_main(args.config, args.overrides, progress=not args.no_progress, prog=batch_prog())


if __name__ == "__main__":
    sys.exit(main())
