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
no dashboard, no usage stats. Actor processes run at niceness 0 (Ray's default is 15). Token
authentication stays on (Ray's default for a new local cluster); Ray's notice saying so on every
run is dropped (``--verbose`` keeps it).

The local Ray lives and dies with its driver: a watcher process (``watch``, its own session, so
a signal to the driver's process group leaves it) follows the driver's pid and, when the driver
is gone without stopping Ray (``kill -9``, the OOM killer), kills the processes of that Ray by
their ids: the driver's descendants, which are every process ``ray.init`` starts (``ray_pids``)
and theirs. The watcher starts before ``ray.init``, so a driver that dies while Ray is still
starting leaves nothing either; an ``init`` that fails shuts down what it started. Ray's own fate-sharing
ends GCS, raylet and workers, but its dashboard and runtime-env agents are left (about 200 MB) for
a minute or more.

For shell recipes (`ray start --head` on ports of its own): ``python -m
spd_cluster.cluster.runtime free-ports N`` prints N ports free on 127.0.0.1, and ``wait-head URL
--pid PID`` waits until that head's dashboard answers (README, scripts/submit_s3_demo.sh).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

LOCAL_IP = "127.0.0.1"
WATCH_EVERY_S = 0.5  # the watcher's period: how soon it sees new Ray processes and a dead driver
# Ray's fixed defaults (GCS, dashboard, client server, dashboard agent, metrics) and moto's: never handed out
DEFAULT_PORTS = frozenset({6379, 8265, 10001, 52365, 8080, 9000})
VERBOSE = False  # --verbose: Ray logs at INFO and warns as it likes
_watcher: subprocess.Popen | None = None


def loopback_env() -> None:
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    try:
        from ray._private import ray_constants

        ray_constants.ENABLE_RAY_CLUSTER = False
    except ImportError:  # pragma: no cover - ray layout changed; the env var still applies
        pass


def set_verbose(on: bool) -> None:
    """``--verbose``: our loggers and Ray's at INFO, Ray's own start-up warnings kept."""
    global VERBOSE
    VERBOSE = on
    if on:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        logging.getLogger("spd_cluster").setLevel(logging.INFO)


def init_ray(address: str | None, num_cpus: int, num_gpus: int | None = None,
             resources: dict[str, float] | None = None) -> bool:
    """Make sure Ray is up; return True when this call started a local Ray (stop it after).
    ``resources``: custom resources of the local Ray (``{"qaic": cards}``)."""
    import ray

    level = logging.INFO if VERBOSE else logging.WARNING
    if ray.is_initialized():
        return False
    if address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=address or None, logging_level=level)
        return False
    loopback_env()
    if not VERBOSE:
        _quiet_token_notice()
    # the watcher first: a driver killed while ray.init is starting GCS and raylet leaves them
    # otherwise (they are the driver's children, which the watcher follows from the start)
    start_watcher([], descendants=True)
    # Ray starts workers at niceness 15; here the actors are the job, so they run at the
    # driver's priority (otherwise any other process on the machine starves them).
    try:
        ray.init(address="local", _node_ip_address=LOCAL_IP, include_dashboard=False, num_cpus=num_cpus,
                 num_gpus=num_gpus, resources=resources or None, logging_level=level,
                 _system_config={"worker_niceness": 0})
    except BaseException:
        ray.shutdown()  # what it started so far (the watcher still ends the rest with the driver)
        raise
    return True


class _DropTokenNotice(logging.Filter):
    """Drops Ray's notice that a new local cluster has token authentication on (its default,
    which needs nothing of the user): printed on every run, it only says Ray did its default."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Token authentication is enabled for this Ray cluster")


def _quiet_token_notice() -> None:
    log = logging.getLogger("ray._private.authentication.authentication_token_setup")
    if not any(isinstance(f, _DropTokenNotice) for f in log.filters):
        log.addFilter(_DropTokenNotice())


def shutdown_ray(started: bool) -> None:
    if started:
        import ray

        ray.shutdown()
        stop_watcher()


# -- the local Ray dies with its driver ----------------------------------------------------------

def ray_pids() -> list[int]:
    """The pids of the processes ``ray.init`` started in this process (GCS, raylet, monitor,
    dashboard, log monitor), from Ray's node info; [] when it started none. All of them are the
    driver's children, which is what the watcher follows (tests/test_shared_machine.py checks it)."""
    try:
        from ray._private import worker

        node = worker._global_node
        procs = node.all_processes.items() if node is not None else ()
    except (ImportError, AttributeError):  # pragma: no cover - ray layout changed: no watcher
        return []
    return [p.process.pid for _, infos in procs for p in infos if getattr(p, "process", None) is not None]


def start_watcher(pids: list[int], driver: int | None = None, descendants: bool = False) -> subprocess.Popen | None:
    """Start the watcher of ``pids`` (and their descendants; with ``descendants``, the driver's
    own too) for ``driver`` (default: this process); ``stop_watcher`` ends it once Ray is stopped
    the normal way. A new one replaces the last."""
    global _watcher
    if not pids and not descendants:
        return None
    stop_watcher()
    package_root = str(Path(__file__).resolve().parents[2])  # importable however this driver was started
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")])))
    _watcher = subprocess.Popen(
        [sys.executable, "-m", "spd_cluster.cluster.runtime", "watch", str(driver or os.getpid()), *map(str, pids),
         *(["--descendants"] if descendants else [])],
        env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True, close_fds=True)
    return _watcher


def stop_watcher() -> None:
    global _watcher
    if _watcher is not None:
        _watcher.terminate()
        try:
            _watcher.wait(timeout=10)
        except subprocess.TimeoutExpired:  # pragma: no cover - it has nothing to finish
            _watcher.kill()
        _watcher = None


def watch(driver: int, pids: list[int], every: float = WATCH_EVERY_S, descendants: bool = False) -> list[int]:
    """Follow ``driver``; when it is gone, SIGKILL ``pids`` and every descendant of theirs seen
    (with ``descendants``, the driver's own as well, the watcher excepted), each identified by pid
    and start time, so a reused pid is never hit. Returns the pids killed."""
    import psutil

    try:
        drv = psutil.Process(driver)
    except psutil.NoSuchProcess:
        drv = None
    known: dict[int, psutil.Process] = {}
    for pid in pids:
        try:
            known[pid] = psutil.Process(pid)
        except psutil.NoSuchProcess:
            pass

    me = os.getpid()

    def sweep() -> None:
        if descendants and drv is not None:
            try:
                for c in drv.children(recursive=True):
                    if c.pid != me:
                        known.setdefault(c.pid, c)
            except psutil.Error:
                pass
        for p in list(known.values()):
            try:
                for c in p.children(recursive=True):
                    known.setdefault(c.pid, c)
            except psutil.Error:
                pass

    while drv is not None and drv.is_running() and drv.status() != psutil.STATUS_ZOMBIE:
        sweep()
        time.sleep(every)
    sweep()  # what the dead driver's Ray started since the last look
    killed = []
    for p in known.values():
        try:
            p.kill()  # psutil checks the start time first: a pid taken by another process is left alone
            killed.append(p.pid)
        except psutil.Error:
            pass
    psutil.wait_procs([p for p in known.values() if p.pid in killed], timeout=5)
    return killed


# -- helpers for shell recipes ---------------------------------------------------------------------

def free_ports(n: int, host: str = LOCAL_IP) -> list[int]:
    """``n`` distinct ports free on ``host`` now (bound together, then released), none of Ray's
    or moto's defaults: for a `ray start --head` (and an S3 server) of a recipe's own."""
    import socket

    socks: list[socket.socket] = []
    try:
        while len(socks) < n:
            s = socket.socket()
            s.bind((host, 0))
            if s.getsockname()[1] in DEFAULT_PORTS:
                s.close()
                continue
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def wait_head(url: str, pid: int | None = None, timeout: float = 180.0) -> bool:
    """Wait until a head's dashboard at ``url`` answers (any HTTP status: with token auth it says
    401); False when ``pid`` (the `ray start --block` process) ends first or time runs out."""
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pid is not None and not _alive(pid):
            return False
        try:
            urllib.request.urlopen(f"{url.rstrip('/')}/api/version", timeout=2)
            return True
        except urllib.error.HTTPError:
            return True
        except OSError:
            time.sleep(0.5)
    return False


def _alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m spd_cluster.cluster.runtime",
                                description="Helpers for a Ray of one's own on 127.0.0.1.")
    sub = p.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("free-ports", help="print N ports free on 127.0.0.1 now (none of Ray's defaults)")
    f.add_argument("n", type=int)
    w = sub.add_parser("wait-head", help="wait until a Ray head's dashboard answers")
    w.add_argument("url")
    w.add_argument("--pid", type=int, default=None, help="the `ray start --block` process: give up if it ends")
    w.add_argument("--timeout", type=float, default=180.0)
    k = sub.add_parser("watch", help="(internal) kill a local Ray's processes when its driver dies")
    k.add_argument("driver", type=int)
    k.add_argument("pids", type=int, nargs="*")
    k.add_argument("--descendants", action="store_true", help="the driver's descendants too")
    args = p.parse_args(argv)
    if args.cmd == "free-ports":
        print(*free_ports(args.n))
        return 0
    if args.cmd == "wait-head":
        if wait_head(args.url, args.pid, args.timeout):
            return 0
        print(f"the Ray head at {args.url} did not come up (see its log)", file=sys.stderr)
        return 1
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C is the driver's to handle
    watch(args.driver, args.pids, descendants=args.descendants)
    return 0


if __name__ == "__main__":
    sys.exit(main())
