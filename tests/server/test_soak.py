"""The soak command (loadtest/soak.py, docs/RELIABILITY.md "The 30-minute soak"): its arithmetic, and the
same command for a few seconds against the real tiny server, so that it cannot rot."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

from loadtest.soak import parse_duration, percentile, server_processes, windows

ROOT = Path(__file__).resolve().parents[2]
STUBS = {"stub:minigpt5", "stub:vision_encoder", "stub:vicuna_decoder", "stub:image_decoder"}


def test_parse_duration():
    assert [parse_duration(t) for t in ("90s", "30m", "1h", "1h30m", "2.5")] == [90, 1800, 3600, 5400, 2.5]
    for bad in ("", "30x", "m", "0s", "-5"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_duration(bad)


def test_windows_bin_requests_by_end_time_and_the_tail_counts_in_the_last():
    t0 = 1000.0
    requests = [
        {"time": t0 + t, "ms": ms, "error": err}
        for t, ms, err in [(1, 100, ""), (2, 300, ""), (3, 50, "boom"), (61, 200, ""), (121, 400, "")]
    ]
    rows = windows(requests, t0, 120, 60)  # the last request ended after the load stopped
    assert [(r["from_s"], r["to_s"], r["requests"], r["failures"]) for r in rows] == [(0, 60, 3, 1), (60, 120, 2, 0)]
    assert rows[0]["p95_ms"] == 300 and rows[0]["p50_ms"] == 100  # failures are not latencies
    assert rows[1]["p50_ms"] == 200 and rows[1]["p95_ms"] == 400
    assert percentile([], 95) is None and percentile([5], 95) == 5


def test_a_pid_without_tritonserver_is_refused():
    lone = subprocess.Popen(["sleep", "30"])  # not this process: the session's tritonserver is its child
    try:
        with pytest.raises(ValueError, match="no tritonserver"):
            server_processes(lone.pid)
    finally:
        lone.kill()
        lone.wait()


@pytest.mark.server
def test_the_soak_command_runs_briefly_against_the_real_server(triton_server, tmp_path):
    out = tmp_path / "soak"
    command = [
        sys.executable,
        "-m",
        "loadtest.soak",
        "--host",
        f"http://{triton_server.http_url}",
        "--grpc-url",
        triton_server.grpc_url,
        "--server-pid",
        str(triton_server.process.process.pid),
        "--duration",
        "8s",
        "--window",
        "4s",
        "--sample-every",
        "2s",
        "--users",
        "2",
        "--think-time",
        "0.2",
        "--out",
        str(out),
        "--",
        "--max-tokens",
        "16",
        "--steps",
        "4",
    ]
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}\n{triton_server.log_tail()}"
    assert "soak: PASSED" in proc.stdout and "| window (min:s) |" in proc.stdout
    summary = json.loads((out / "soak.json").read_text())
    assert summary["requests"] > 0 and summary["failures"] == 0 and summary["passed"]
    assert [(w["from_s"], w["to_s"]) for w in summary["windows"]] == [(0, 4), (4, 8)]
    assert sum(w["requests"] for w in summary["windows"]) == summary["requests"]
    assert set(summary["rss_mb"]) == {"tritonserver"} | STUBS
    for name, rss in summary["rss_mb"].items():
        assert rss["start"] > 0 and rss["end"] > 0, name
    assert all(summary["alive_at_end"].values())
    assert {k.split()[1] for k in summary["by_kind"]} <= {"text", "image_in", "image_out"}
    assert summary["load1"]["start"] >= 0 and len(summary["rss_samples"]) >= 3
    for report in ("soak_stats.csv", "soak_stats_history.csv", "soak.html", "requests.csv"):
        assert (out / report).stat().st_size > 0, report
