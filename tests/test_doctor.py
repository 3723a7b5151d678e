"""`spd-cluster doctor`: one line per check, each not-ok one with what to do; fast (no model, no
Ray started); exit 1 only for what must be fixed."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from spd_cluster import doctor, store

NAMES = ["python", "venv", "torch", "ray", "ports", "models", "qefficient", "bf16-kernel"]


def test_doctor_checks_this_machine_quickly_without_loading_a_model():
    code = ("import json, sys\nfrom spd_cluster.cli import main\nrc = main(['doctor', '--json'])\n"
            "print(json.dumps({'rc': rc, 'mods': sorted(m for m in ('transformers', 'ray.worker') if m in sys.modules)}))")
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    took = time.monotonic() - t0
    assert out.returncode == 0, out.stderr[-2000:]
    *body, last = out.stdout.strip().splitlines()
    checks, tail = json.loads("\n".join(body)), json.loads(last)
    assert [c["name"] for c in checks] == NAMES
    assert all(c["state"] in ("ok", "warn", "PROBLEM") for c in checks)
    assert all(c["fix"] for c in checks if c["state"] != "ok")  # each one that is not ok says what to do
    by = {c["name"]: c for c in checks}
    assert by["python"]["state"] == "ok" and sys.executable in by["python"]["detail"]
    assert ("CPU build" in by["torch"]["detail"]) or ("CUDA" in by["torch"]["detail"])
    assert "smollm2-135m" in by["models"]["detail"]
    assert tail["rc"] == 0 and "transformers" not in tail["mods"]  # no model loaded
    assert took < 60, took


def test_doctor_says_what_to_do(monkeypatch, tmp_path, capsys):
    import types

    monkeypatch.setattr(sys, "version_info", types.SimpleNamespace(major=3, minor=10, micro=4))
    c = doctor.check_python()
    assert c.state == doctor.PROBLEM and "3.11" in c.fix
    # a venv that is not active: how to reach its commands
    venv = tmp_path / "v"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "spd-cluster").write_text("#!/bin/sh\n")
    (venv / "bin" / "spd-cluster").chmod(0o755)
    monkeypatch.setattr(sys, "prefix", str(venv))
    monkeypatch.setattr(sys, "base_prefix", "/usr")
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    c = doctor.check_venv()
    assert c.state == doctor.WARN and "bin/activate" in c.fix and "bin/spd-cluster" in c.fix
    monkeypatch.setenv("PATH", f"{venv / 'bin'}:/usr/bin")
    assert doctor.check_venv().state == doctor.OK
    monkeypatch.setattr(sys, "base_prefix", str(venv))
    assert "make setup" in doctor.check_venv().fix
    # the demo's model missing: a problem, with the command that installs it
    rows = [dict(r, installed=False, prepared=False, next=store.KNOWN_MODELS[r["alias"]].install_hint)
            for r in store.models_list_rows()]
    monkeypatch.setattr(store, "models_list_rows", lambda: rows)
    c = doctor.check_models()
    assert c.state == doctor.PROBLEM and "models install smollm2-135m" in c.fix
    # the bf16 kernel on a CPU without AVX2
    from spd_cluster.sessions import bf16

    monkeypatch.setattr(bf16, "kernel_runs", lambda: False)
    assert doctor.check_bf16_kernel().state == doctor.WARN
    # a problem makes the exit code 1, and the text names it
    import argparse

    monkeypatch.setattr(doctor, "checks", lambda build=False: [doctor.check_models(), doctor.check_python()])
    assert doctor.main(argparse.Namespace(build=False, json=False)) == 1
    out = capsys.readouterr().out
    assert "PROBLEM" in out and "-> " in out and out.strip().endswith("2 problems to fix")


def test_models_prepared_in_the_cache_but_not_installed_here_are_fine(monkeypatch):
    """Prepared in the shared cache, their packages not in this environment (.venv-qaic beside
    .venv): usable, nothing to install (the QEfficient lane's doctor failed on them)."""
    rows = [dict(r, installed=r["alias"] == "smollm2-135m", prepared=True, next=None)
            for r in store.models_list_rows()]
    monkeypatch.setattr(store, "models_list_rows", lambda: rows)
    c = doctor.check_models()
    assert c.state == doctor.OK and not c.fix and "qwen2.5-coder-1.5b" in c.detail


def test_make_doctor_runs_it():
    text = (Path(__file__).resolve().parents[1] / "Makefile").read_text()
    assert "\ndoctor:" in text and "spd-cluster doctor" in text
