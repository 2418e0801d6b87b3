"""`python -m minigpt5.bench stages|e2e ...`: the benches alone, without the rest of the CLI (for a
bare GPU machine where the client's or server's extra packages are absent). Same flags and output
as `minigpt5 bench ...`."""

from __future__ import annotations

import argparse
import sys

from .args import add_bench_commands


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m minigpt5.bench", description="benchmarks that print JSON")
    add_bench_commands(parser.add_subparsers(dest="bench_command", required=True, metavar="WHICH"))
    args = parser.parse_args(argv)
    return args.handler(args) or 0


if __name__ == "__main__":
    sys.exit(main())
