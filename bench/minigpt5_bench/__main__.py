"""`minigpt5-bench stages|e2e|...` (or `python -m minigpt5_bench ...`): benchmarks that print one JSON
object. A package of its own above `minigpt5`: it measures the model and the server, nothing in them
imports it."""

from __future__ import annotations

import argparse
import sys

from .args import add_bench_commands


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="minigpt5-bench", description="benchmarks that print JSON")
    add_bench_commands(parser.add_subparsers(dest="bench_command", required=True, metavar="WHICH"))
    args = parser.parse_args(argv)
    return args.handler(args) or 0


if __name__ == "__main__":
    sys.exit(main())
