"""Flags and flag types shared by the benches' parsers (stdlib only: parsers are built without torch)."""

from __future__ import annotations

import argparse
from pathlib import Path


def int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def name_list(text: str) -> list[str]:
    """A comma-separated flag value as a list (empty items dropped)."""
    return [v.strip() for v in text.split(",") if v.strip()]


DTYPES = ["auto", "fp32", "bf16", "fp16"]


def add_weights(p: argparse.ArgumentParser, what: str = "weights directory") -> None:
    p.add_argument("--weights", type=Path, help=f"{what} (default: the built-in tiny weights)")


def add_dtype(p: argparse.ArgumentParser, flag: str, what: str, gpu_default: str = "bf16") -> None:
    p.add_argument(flag, choices=DTYPES, default="auto", help=f"{what} dtype (auto: fp32 on CPU, {gpu_default} on GPU)")


def add_threads(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--threads",
        type=int,
        help="torch threads (default: 1 on CPU: the tiny matrices gain nothing from more, and OpenMP waits on a "
        "shared machine dominate; 0 = leave torch's default)",
    )


def add_skip(p: argparse.ArgumentParser, sections: str) -> None:
    p.add_argument("--skip", type=name_list, default=[], help=f"comma-separated sections to skip: {sections}")
