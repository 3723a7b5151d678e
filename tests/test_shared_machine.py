"""Safe on a machine others share: recipes start a Ray of their own on free ports and stop only
what they started (never a bare `ray stop`, no fixed default ports); a driver that dies leaves
nothing of its local Ray behind (runtime's watcher)."""

from __future__ import annotations

import http.server
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from spd_cluster.cluster import runtime

REPO = Path(__file__).resolve().parents[1]


# -- free ports, a head's readiness ------------------------------------------------------------

def test_free_ports_are_distinct_bindable_and_never_a_default():
    ports = runtime.free_ports(8)
    assert len(set(ports)) == 8 and not set(ports) & runtime.DEFAULT_PORTS
    assert {6379, 8265, 9000} <= runtime.DEFAULT_PORTS
    socks = []
    try:
        for p in ports:  # all free at once
            s = socket.socket()
            s.bind(("127.0.0.1", p))
            socks.append(s)
    finally:
        for s in socks:
            s.close()
    out = subprocess.run([sys.executable, "-m", "spd_cluster.cluster.runtime", "free-ports", "5"],
                         capture_output=True, text=True, check=True)
    assert len(set(map(int, out.stdout.split()))) == 5


def test_free_ports_skips_a_default_the_os_hands_out(monkeypatch):
    handed = iter([6379, 8265, 41000, 41001])

    class FakeSocket:
        def bind(self, addr):
            self.port = next(handed)

        def getsockname(self):
            return ("127.0.0.1", self.port)

        def close(self):
            pass

    monkeypatch.setattr(socket, "socket", FakeSocket)
    assert runtime.free_ports(2) == [41000, 41001]


def test_wait_head_answers_on_any_http_status_and_gives_up_when_its_process_ends():
    class Deny(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # a head with token auth answers 401 without the token
            self.send_response(401)
            self.end_headers()

        def log_message(self, *a):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Deny)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        assert runtime.wait_head(f"http://127.0.0.1:{server.server_port}", timeout=10)
    finally:
        server.shutdown()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    port = runtime.free_ports(1)[0]  # nothing listens there
    t0 = time.monotonic()
    assert not runtime.wait_head(f"http://127.0.0.1:{port}", pid=dead.pid, timeout=30)
    assert time.monotonic() - t0 < 5
    assert not runtime.wait_head(f"http://127.0.0.1:{port}", timeout=1)


# -- no recipe stops every Ray or takes a fixed port ---------------------------------------------

RECIPES = ["README.md", "Makefile", "docs/**/*.md", "scripts/**/*", "jobs/**/*", "bench/**/*"]
RAY_STOP = re.compile(r"(^|[\s;&|(`/\"'])ray[\"']?(,\s*[\"']|\s+)stop\b")
FIXED_PORT = re.compile(r"127\.0\.0\.1:(6379|8265|9000|10001)\b|(--port[= ]|--dashboard-port[= ]|-p\s+|PORT:-)(6379|8265|9000)\b")


def _commands(path: Path) -> list[tuple[int, str]]:
    """(line number, text) of what a file runs: a Markdown file's fenced code blocks, any other
    file whole; shell/Python/Make comments dropped (they may say why not to run `ray stop`)."""
    lines = path.read_text(errors="replace").splitlines()
    out, fenced = [], path.suffix != ".md"
    for i, line in enumerate(lines, 1):
        if path.suffix == ".md" and line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if fenced:
            out.append((i, re.sub(r"(^|\s)#.*$", "", line)))
    return out


def _recipe_files() -> list[Path]:
    files = {p for pattern in RECIPES for p in REPO.glob(pattern) if p.is_file()}
    return sorted(p for p in files if p.suffix in {".md", ".sh", ".py", ".yaml", ".yml", ""} and "__pycache__" not in p.parts)


def test_no_recipe_runs_ray_stop_or_uses_a_fixed_default_port():
    files = _recipe_files()
    assert REPO / "README.md" in files and REPO / "scripts" / "submit_s3_demo.sh" in files
    bad = [f"{p.relative_to(REPO)}:{i}: {text.strip()}" for p in files for i, text in _commands(p)
           if RAY_STOP.search(text) or FIXED_PORT.search(text)]
    assert not bad, "\n".join(bad)


def test_the_checks_catch_what_they_look_for(tmp_path):
    md = tmp_path / "x.md"
    md.write_text("Never run `ray stop` here.\n```bash\nray start --head\n.venv/bin/ray stop   # all of them\n"
                  "ray job submit --address http://127.0.0.1:8265 -- x\n```\n")
    found = [t for _, t in _commands(md) if RAY_STOP.search(t) or FIXED_PORT.search(t)]
    assert len(found) == 2  # the prose line is not a command; the two commands are caught
    sh = tmp_path / "x.sh"
    sh.write_text('PORT=${PORT:-9000}\nsubprocess.run(["ray", "stop"])\n# ray stop would stop them all\n')
    assert len([t for _, t in _commands(sh) if RAY_STOP.search(t) or FIXED_PORT.search(t)]) == 2


def test_submit_s3_demo_script_stops_only_its_own_processes():
    text = (REPO / "scripts" / "submit_s3_demo.sh").read_text()
    assert "free-ports" in text and "--temp-dir" in text and "--block" in text
    assert re.search(r'kill "\$HEAD"', text) and re.search(r'kill "\$MOTO"', text)
    for flag in ("--port=", "--dashboard-port=", "--ray-client-server-port=", "--dashboard-agent-listen-port="):
        assert flag in text, flag
    assert subprocess.run(["bash", "-n", str(REPO / "scripts" / "submit_s3_demo.sh")]).returncode == 0


# -- a dead driver's Ray is stopped -----------------------------------------------------------

def _sleeper(*, new_session: bool = False, child: bool = False) -> subprocess.Popen:
    code = "import time\n"
    if child:  # a process with a child of its own, as raylet has its agents
        code += "import subprocess, sys\nsubprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
    code += "time.sleep(120)"
    return subprocess.Popen([sys.executable, "-c", code], start_new_session=new_session)


def test_watch_kills_a_dead_drivers_processes_and_their_children_only():
    driver, root, bystander = _sleeper(), _sleeper(new_session=True, child=True), _sleeper()
    procs = [driver, root, bystander]
    try:
        deadline = time.monotonic() + 30
        while not psutil.Process(root.pid).children() and time.monotonic() < deadline:
            time.sleep(0.05)
        (grandchild,) = psutil.Process(root.pid).children()
        killed = []
        t = threading.Thread(target=lambda: killed.extend(runtime.watch(driver.pid, [root.pid], every=0.05)))
        t.start()
        time.sleep(0.5)
        assert t.is_alive() and root.poll() is None and grandchild.is_running()  # the driver lives: nothing touched
        driver.kill()
        driver.wait()
        t.join(timeout=20)
        assert not t.is_alive()
        assert sorted(killed) == sorted([root.pid, grandchild.pid])
        root.wait(timeout=5)  # (its status may already be reaped by the watcher's wait: it is our child here)
        assert not psutil.pid_exists(root.pid) or psutil.Process(root.pid).status() == psutil.STATUS_ZOMBIE
        psutil.wait_procs([grandchild], timeout=5)
        assert not grandchild.is_running() or grandchild.status() == psutil.STATUS_ZOMBIE
        assert bystander.poll() is None  # not the driver's Ray: left alone
    finally:
        for p in procs:
            p.kill()
            p.wait()


def test_watch_follows_the_drivers_own_children_it_was_never_told_of():
    """With ``descendants`` (a local Ray's watcher starts before ``ray.init``): a child the driver
    starts after the watcher began, as GCS and raylet are, dies with the driver; the watcher
    itself, also the driver's child, and other processes are left."""
    driver, bystander = _sleeper(child=True), _sleeper()
    try:
        killed = []
        t = threading.Thread(target=lambda: killed.extend(runtime.watch(driver.pid, [], every=0.05,
                                                                         descendants=True)))
        t.start()
        deadline = time.monotonic() + 30
        while not psutil.Process(driver.pid).children() and time.monotonic() < deadline:
            time.sleep(0.05)
        (child,) = psutil.Process(driver.pid).children()
        time.sleep(0.3)
        assert t.is_alive() and child.is_running()  # the driver lives: nothing touched
        driver.kill()
        driver.wait()
        t.join(timeout=20)
        assert not t.is_alive() and killed == [child.pid]
        psutil.wait_procs([child], timeout=5)
        assert not child.is_running() or child.status() == psutil.STATUS_ZOMBIE
        assert bystander.poll() is None
    finally:
        for p in (driver, bystander):
            p.kill()
            p.wait()


def _session_processes(pids: list[int]) -> list[psutil.Process]:
    out = []
    for pid in pids:
        try:
            p = psutil.Process(pid)
            if p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.NoSuchProcess:
            pass
    return out


DRIVER = """
import json, os, sys, time
import psutil, ray
from spd_cluster.cluster import runtime
runtime.init_ray(None, num_cpus=1)
@ray.remote
def f():
    return os.getpid()
ray.get(f.remote())
me = psutil.Process()
kids = [c.pid for c in me.children(recursive=True)]
print(json.dumps({"ray": runtime.ray_pids(), "all": kids, "watcher": runtime._watcher.pid}), flush=True)
time.sleep(600)
"""


@pytest.mark.slow
def test_a_killed_driver_leaves_nothing_of_its_local_ray():
    """kill -9 of a driver that started a local Ray: every process of that Ray (its agents too,
    which Ray itself leaves for a minute or more) and the watcher are gone within seconds."""
    import json

    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    drv = subprocess.Popen([sys.executable, "-c", DRIVER], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True, env=env)
    try:
        line = drv.stdout.readline()
        assert line, drv.stderr.read()[-3000:]
        info = json.loads(line)
        pids = sorted(set(info["all"]) - {info["watcher"]})
        names = {p.pid: p.name() for p in _session_processes(pids)}
        assert set(info["ray"]) <= set(pids) and any("Agent" in n for n in names.values()), names
        drv.kill()
        drv.wait()
        t0 = time.monotonic()
        left = _session_processes(pids + [info["watcher"]])
        while left and time.monotonic() - t0 < 15:
            time.sleep(0.5)
            left = _session_processes(pids + [info["watcher"]])
        assert not left, [(p.pid, p.name()) for p in left]
    finally:
        if drv.poll() is None:
            drv.kill()
            drv.wait()
        for p in _session_processes(info["all"] if "info" in dir() else []):
            p.kill()


DIES_IN_INIT = """
import json, os, signal
import psutil, ray
from spd_cluster.cluster import runtime
real_init = ray.init
def init(*args, **kwargs):  # Ray's processes up, then the driver killed before ray.init returns
    real_init(*args, **kwargs)
    me = psutil.Process()
    watcher = runtime._watcher.pid if runtime._watcher is not None else None
    print(json.dumps({"all": [c.pid for c in me.children(recursive=True)], "watcher": watcher}), flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
ray.init = init
runtime.init_ray(None, num_cpus=1)
"""


@pytest.mark.slow
def test_a_driver_killed_inside_ray_init_leaves_nothing_of_its_local_ray():
    """A driver killed while ``ray.init`` is still starting its local Ray (before init_ray knows
    Ray's processes): GCS, raylet and the rest are gone within seconds all the same (they were
    left running before the watcher started ahead of ``ray.init``)."""
    import json

    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    drv = subprocess.Popen([sys.executable, "-c", DIES_IN_INIT], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True, env=env)
    info = {"all": []}
    try:
        line = drv.stdout.readline()
        assert line, drv.stderr.read()[-3000:]
        info = json.loads(line)
        drv.wait(timeout=30)
        pids = sorted(set(info["all"]) - {info["watcher"]})
        assert pids  # GCS, raylet, ...
        t0 = time.monotonic()
        left = _session_processes(pids + [info["watcher"] or 0])
        while left and time.monotonic() - t0 < 15:
            time.sleep(0.5)
            left = _session_processes(pids + [info["watcher"] or 0])
        assert not left, [(p.pid, p.name()) for p in left]
        assert info["watcher"] is not None  # it was there before ray.init returned
    finally:
        if drv.poll() is None:
            drv.kill()
            drv.wait()
        for p in _session_processes(info["all"]):
            p.kill()


# -- quiet by default ----------------------------------------------------------------------------

def test_rays_token_notice_is_dropped_unless_verbose(caplog, monkeypatch):
    import logging

    log = logging.getLogger("ray._private.authentication.authentication_token_setup")
    monkeypatch.setattr(log, "filters", [])
    notice = ("Token authentication is enabled for this Ray cluster. Set RAY_AUTH_MODE=disabled to opt out. "
              "For more information, see https://docs.ray.io/en/latest/ray-security/token-auth.html")
    with caplog.at_level(logging.WARNING):
        log.warning(notice)
        assert notice in caplog.text  # Ray's own behaviour
        caplog.clear()
        runtime._quiet_token_notice()
        runtime._quiet_token_notice()  # once is enough, twice adds nothing
        assert len(log.filters) == 1
        log.warning(notice)
        log.warning("Token authentication is disabled for this Ray cluster. Anyone with network access ...")
    assert notice not in caplog.text and "is disabled" in caplog.text  # only the notice that asks nothing


def test_verbose_flag_of_run_and_the_job_entrypoint(monkeypatch):
    from spd_cluster.cli import build_parser

    monkeypatch.setattr(runtime, "VERBOSE", False)
    args = build_parser(["run"]).parse_args(["run", "c.yaml"])
    assert args.verbose is False and runtime.VERBOSE is False
    import logging

    monkeypatch.setattr(logging, "basicConfig", lambda **kw: None)
    monkeypatch.setattr(logging.getLogger("spd_cluster"), "level", logging.NOTSET)
    args = build_parser(["run"]).parse_args(["run", "c.yaml", "--verbose"])
    assert args.verbose is True and runtime.VERBOSE is True
    assert logging.getLogger("spd_cluster").level == logging.INFO
