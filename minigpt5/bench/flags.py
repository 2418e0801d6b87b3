"""Types of flag values shared by the benches' parsers (stdlib only: parsers are built without torch)."""

from __future__ import annotations

import argparse


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
