"""The client's command line run as a user runs it: `python -m minigpt5_client` in a fresh process that
sees only the client package (no torch, no server code)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

CLIENT_DIR = Path(__file__).resolve().parents[2] / "client"


def run_cli(*args: str, stdin: str = "", timeout: float = 60) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(CLIENT_DIR))
    return subprocess.run(
        [sys.executable, "-m", "minigpt5_client", *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )
