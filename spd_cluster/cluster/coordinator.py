"""The coordinator: a job's way from its config to its summary, one stage after the other.

    config     spd_cluster/config.py     load_config: the YAML and --set overrides, checked
    preflight  cluster/preflight.py      everything that can fail before a model loads
    plan       cluster/plan.py           the shards to run, the resume state (from the checkpoint)
    schedule   cluster/schedule.py       pairs, placement, prefetch, retries (Ray)
    commit     cluster/commit.py         shard records, job.json, the checkpoint
    finish     cluster/finish.py         reduce, exec_info, job.json's final state

Each stage has one entry point and typed inputs and outputs, and imports none after it
(tests/test_imports.py); only this module sees them all. The driver and the actors talk in
cluster/messages.py's types. See docs/architecture.md.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Callable, Optional

from ..config import JobConfig
from .commit import CHECKPOINT_EVERY_S, JOB_WRITE_EVERY_S, Checkpoint, all_audit_rows, open_job, written_behind  # noqa: F401
from .errors import JobCancelled, JobError  # noqa: F401 - re-exported
from .finish import Ending, JobResult, audit_failure, finish  # noqa: F401 - JobResult re-exported
from .plan import plan as plan_job
from .plan import prepare_output  # noqa: F401 - re-exported
from .preflight import OutputState, check_job_models, inspect_output, local_qaic_resources  # noqa: F401
from .preflight import preflight
from ..engine.reduce import first_batch_ttft
from .schedule import PREFETCH, Scheduler, Timings, schedule  # noqa: F401
from . import suffix_cache

RECOVER_TIMEOUT_S = 600.0  # give up when every live pair has been recovering this long
LIVE_EVERY_S = 1.0  # how often the progress bar asks a busy pair what its shard has finished

_Run = Scheduler  # the name it had


def _ray_info(started: bool) -> dict:
    import ray

    ctx = ray.get_runtime_context()
    return {"started_locally": started, "gcs_address": getattr(ctx, "gcs_address", None),
            "nodes": sum(1 for n in ray.nodes() if n.get("Alive")), "version": ray.__version__}


@contextmanager
def _keep_sigterm_handler():
    """ray.init replaces the SIGTERM handler (Python's with sys.exit, then its core worker's C++
    one, which logs and aborts): put back the caller's own handler, if it set one (the CLI's
    turns SIGTERM into a cancel)."""
    import signal
    import threading

    main = threading.current_thread() is threading.main_thread()
    handler = signal.getsignal(signal.SIGTERM) if main else None
    try:
        yield
    finally:
        if callable(handler):
            signal.signal(signal.SIGTERM, handler)


def run_job(cfg: JobConfig, *, progress: bool = True, on_event: Optional[Callable[..., None]] = None,
            command: Optional[str] = None) -> JobResult:
    """Run a job end to end, stage by stage (see the module docstring). The preflight raises
    DatasetError / OutputError / ConfigError before any actor starts; JobError when the job
    cannot finish, JobCancelled / KeyboardInterrupt when it is stopped (what was done stays on
    disk either way). ``command``: how to run this job again (job.json keeps it with the run,
    `status` shows it to resume)."""
    from ..status import HEARTBEAT_S
    from .runtime import init_ray, shutdown_ray

    plan = plan_job(preflight(cfg, for_run=True))
    c = cfg.cluster
    job = open_job(plan, command, every_s=HEARTBEAT_S)
    sink = Checkpoint(plan.out, dict(plan.records), job)
    run = Scheduler(plan, sink, on_event, progress, Timings(LIVE_EVERY_S, RECOVER_TIMEOUT_S))
    job.progress = run.snapshot
    job.write()
    job.start_heartbeat()
    started, status, error = False, "failed", None
    try:
        if plan.todo:
            with _keep_sigterm_handler():
                started = init_ray(c.address, num_cpus=c.num_pairs * cfg.method.actors_per_pair * c.cpus_per_actor,
                                   resources=local_qaic_resources(cfg))
            job.data["ray"] = job.run["placement"]["ray"] = _ray_info(started)
            job.write()
            cache = suffix_cache.start(cfg, plan.out, plan.records)  # noqa: F841 - suffix: the job-wide index's actor, held to the end
            schedule(run)
        if run.failed:
            raise JobError(f"{len(run.failed)} shard(s) failed past {c.max_retries} retries: "
                           + "; ".join(f"shard {k}: {v}" for k, v in sorted(run.failed.items())))
        run.check_errors()
        audited = all_audit_rows(sink.records)
        if cfg.audit.fail_on_mismatch and any(r.get("match") is False for r in audited):
            raise JobError(audit_failure(audited))
        status = "completed"
    except BaseException as e:
        if isinstance(e, KeyboardInterrupt):
            import signal

            status, error = "cancelled", f"cancelled by {signal.Signals(JobCancelled.signal_of(e)).name}"
        else:
            error = f"{type(e).__name__}: {e}"
        raise
    finally:
        # a signal now is noted, not raised: these records say how the job ended
        with JobCancelled.held():
            # the output first, Ray after: `ray job stop` SIGKILLs 3 s after its SIGTERM, and Ray's
            # teardown may wait on processes the same signal ended
            job.stop_heartbeat()
            run.progress.close()
            runs = plan.runs
            result = finish(plan, sink.records, Ending(
                status, error, plan.prior_wall_s + run.wall_s(), first_batch_ttft(list(run.first_shards.values())),
                run.startup_s() + sum(float(r.get("actor_startup_s") or 0.0) for r in runs), run.shards_run,
                run.failed), job)
            if not (started and status == "cancelled"):  # a local Ray of ours goes down whole with its shutdown,
                run.close()  # and after a signal to the process group its GCS may be gone (ray.kill would wait on it)
            shutdown_ray(started)
            if status != "completed" and written_behind(plan.out, dict(sink.records), plan.num_shards):
                # a pair finished a shard between the summary and its end: the counts follow the files
                result = finish(plan, sink.records, Ending(status, error, result.wall_time_s, None, 0.0,
                                                           result.shards_run, run.failed), job)
            if status == "completed":
                from ..io import results as rio

                rio.remove_temporaries(plan.out)  # a pair killed mid-write during this run left its temporary
    if JobCancelled.received and status == "completed":
        import signal

        print(f"{signal.Signals(JobCancelled.received).name} came as the job completed: nothing was cancelled",
              file=sys.stderr)
    return result
