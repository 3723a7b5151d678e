"""The embedded default never joins another Ray: a job with ``cluster.address`` unset starts a Ray
of its own (loopback only, free ports) beside a `ray start` head left on the machine, and two jobs
started at once run side by side. Real Ray on 127.0.0.1, real `spd-cluster run` processes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import psutil
import pytest
from helpers import GOOD, write_jsonl  # tiny: a fixture (conftest.py)

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    return env


@pytest.fixture
def ray_start_head():
    """A `ray start --head` as the README's recipe leaves it; stopped after by its own processes
    only (`ray stop` would end every Ray on the machine)."""
    port = free_port()
    out = subprocess.run([str(BIN / "ray"), "start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1",
                          "--dashboard-host=127.0.0.1", "--num-cpus=1", "--disable-usage-stats"],
                         env=clean_env(), capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-2000:]
    session = Path("/tmp/ray/session_latest").resolve().name
    yield f"127.0.0.1:{port}"
    procs = [p for p in psutil.process_iter(["cmdline"]) if session in " ".join(p.info["cmdline"] or [])]
    for p in procs:
        p.kill()
    psutil.wait_procs(procs, timeout=30)
    current = Path("/tmp/ray/ray_current_cluster")
    if current.exists() and current.read_text().strip() == f"127.0.0.1:{port}":
        current.unlink()


def job_config(tmp_path: Path, name: str, tiny: str) -> Path:  # noqa: F811
    ds = write_jsonl(tmp_path / f"{name}.jsonl", [{"id": i, "prompt": p} for i, p in enumerate(GOOD[:4])])
    cfg = {"name": name, "mode": "pld", "target": {"model": tiny},
           "dataset": {"path": str(ds), "id_column": "id"}, "output": {"path": str(tmp_path / name)},
           "spd": {"num_speculative_tokens": 2, "max_new_tokens": 8, "ctx_len": 96, "prefill_seq_len": 16,
                   "full_batch_size": 2},
           "cluster": {"num_pairs": 1, "shard_size": 2, "cpus_per_actor": 1}, "audit": {"fraction": 0}}
    path = tmp_path / f"{name}.yaml"
    path.write_text(json.dumps(cfg))
    return path


@pytest.mark.slow
def test_two_jobs_at_once_beside_a_ray_start_head(tiny, tmp_path, ray_start_head):  # noqa: F811
    procs = []
    for name in ("a", "b"):
        procs.append(subprocess.Popen([str(BIN / "spd-cluster"), "run", str(job_config(tmp_path, name, tiny)),
                                       "--no-progress"], env=clean_env(), stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
        time.sleep(1)  # the second starts while the first is starting its Ray
    for p in procs:
        out, _ = p.communicate(timeout=600)
        assert p.returncode == 0, out[-3000:]
    for name in ("a", "b"):
        df = pd.read_parquet(tmp_path / name / "results")
        assert sorted(df.prompt_id) == ["0", "1", "2", "3"] and df.error.isna().all()
        ray_info = json.loads((tmp_path / name / "job.json").read_text())["ray"]
        assert ray_info["started_locally"] is True and ray_info["gcs_address"] != ray_start_head  # its own
