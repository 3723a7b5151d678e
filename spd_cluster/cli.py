"""`spd-cluster`: the command line. Each room registers its own subcommands."""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    from . import report, store, training
    from .cluster import cli as cluster_cli

    parser = argparse.ArgumentParser(prog="spd-cluster", description="Batch speculative decoding on Ray")
    sub = parser.add_subparsers(dest="command", required=True)
    cluster_cli.add_cli(sub)
    store.add_cli(sub)
    training.add_cli(sub)
    report.add_cli(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
