"""Ray start-up: join a cluster, or start a local one bound to 127.0.0.1 only.

Order of choice:
  1. Ray already initialised in this process (tests, notebooks): use it, leave it running.
  2. `cluster.address` set ("auto", "127.0.0.1:6379", "ray://..."): join it.
  3. RAY_ADDRESS in the environment (what `ray job submit` gives the job's driver): join it.
  4. Otherwise start a local Ray on loopback (the embedded default) and stop it at the end:
     always a new one of this job's own (``address="local"``), whatever other Ray runs on the
     machine (a `ray start` head, another job), on ports free at that moment.

For the local Ray, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 makes Ray use loopback for every address
it would otherwise take from the machine's outward interface; it is set in the environment
(inherited by every Ray process) and in the already-imported constant. Nothing else is opened:
no dashboard, no usage stats. Actor processes run at niceness 0 (Ray's default is 15).
"""

from __future__ import annotations

import logging
import os

LOCAL_IP = "127.0.0.1"


def loopback_env() -> None:
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    try:
        from ray._private import ray_constants

        ray_constants.ENABLE_RAY_CLUSTER = False
    except ImportError:  # pragma: no cover - ray layout changed; the env var still applies
        pass


def init_ray(address: str | None, num_cpus: int, num_gpus: int | None = None,
             resources: dict[str, float] | None = None) -> bool:
    """Make sure Ray is up; return True when this call started a local Ray (stop it after).
    ``resources``: custom resources of the local Ray (``{"qaic": cards}``)."""
    import ray

    if ray.is_initialized():
        return False
    if address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=address or None, logging_level=logging.WARNING)
        return False
    loopback_env()
    # Ray starts workers at niceness 15; here the actors are the job, so they run at the
    # driver's priority (otherwise any other process on the machine starves them).
    ray.init(address="local", _node_ip_address=LOCAL_IP, include_dashboard=False, num_cpus=num_cpus, num_gpus=num_gpus,
             resources=resources or None, logging_level=logging.WARNING, _system_config={"worker_niceness": 0})
    return True


def shutdown_ray(started: bool) -> None:
    if started:
        import ray

        ray.shutdown()
