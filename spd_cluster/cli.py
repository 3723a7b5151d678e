"""`spd-cluster`: the command line. Each room registers its own subcommands (``add_cli``).

Only the room of the command being run is imported, so `spd-cluster --help` and `status` start
in a fraction of a second: the others bring torch, transformers, ray or pandas with them. The
other commands appear in the listing as a name and a line of help (COMMANDS).
"""

from __future__ import annotations

import argparse
import importlib
import sys

# command -> (the module whose add_cli registers it, its line in `spd-cluster --help`)
COMMANDS = {
    "run": ("spd_cluster.cluster.cli", "run a batch SpD job over a prompt dataset on Ray"),
    "validate": ("spd_cluster.cluster.cli", "check a job (config, dataset, models, output, Ray resources) "
                                            "without running it"),
    "status": ("spd_cluster.status", "where a job stands (running or ended), from its output directory"),
    "report": ("spd_cluster.report", "figures of a job's output (finished or running): PNGs, HTML, table"),
    "models": ("spd_cluster.store", "list or prepare packaged models"),
    "train-heads": ("spd_cluster.training", "train multi-projection (multiproj) heads by self-distillation"),
    "doctor": ("spd_cluster.doctor", "check this machine: Python, venv, torch, Ray, ports, models, QEfficient, "
                                     "the bf16 kernel; each with what to do"),
}


def _command(argv: list[str]) -> str | None:
    """The subcommand named in ``argv`` (the first word that is one), if any."""
    return next((a for a in argv if a in COMMANDS), None)


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser for ``argv``: the named command's room registers its subcommands in full; the
    rest stand in by name and help. ``argv=None``: every room registers (imports everything)."""
    parser = argparse.ArgumentParser(prog="spd-cluster", description="Batch speculative decoding on Ray")
    sub = parser.add_subparsers(dest="command", required=True)
    wanted = list(COMMANDS) if argv is None else [_command(argv)]
    for module in dict.fromkeys(COMMANDS[c][0] for c in wanted if c):
        importlib.import_module(module).add_cli(sub)
    for name, (_, help_) in COMMANDS.items():
        if name not in sub.choices:
            sub.add_parser(name, help=help_)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv).parse_args(argv)
    try:
        code = int(args.func(args) or 0)
        sys.stdout.flush()
    except BrokenPipeError:  # `spd-cluster status OUT | head -1`: the reader has all it wanted
        return _closed_pipe()
    return code


def _closed_pipe() -> int:
    """A closed stdout ends the command quietly, as `cat` ends: no traceback, no "Exception
    ignored" at exit (stdout is pointed at /dev/null for the interpreter's last flush), exit
    code 128 + SIGPIPE."""
    import os
    import signal

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # stdout is no file: nothing to flush into it
        pass
    return 128 + signal.SIGPIPE


if __name__ == "__main__":
    sys.exit(main())
