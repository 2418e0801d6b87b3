"""What the probes read off a server: its metrics, its memory; and their small statistics."""

from __future__ import annotations

import urllib.error
import urllib.request
from pathlib import Path


def scrape(metrics_url: str) -> dict[str, float]:
    text = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            series, _, value = line.rpartition(" ")
            try:
                values[series] = float(value)
            except ValueError:
                continue
    return values


def metric(values: dict[str, float], name: str, **labels) -> float:
    """Sum of the series of `name` whose labels include `labels`."""
    total = 0.0
    for series, value in values.items():
        base, _, rest = series.partition("{")
        if base == name and all(f'{k}="{v}"' in rest for k, v in labels.items()):
            total += value
    return total


def outcomes(metrics_url: str) -> dict[str, float]:
    values = scrape(metrics_url)
    return {
        o: metric(values, "minigpt5_requests_total", outcome=o)
        for o in ("ok", "invalid", "overloaded", "cancelled", "error")
    }


def rss_bytes(server) -> int:
    """Resident memory of tritonserver and its stub processes together (/proc, Linux)."""
    pids = [server.process.process.pid, *server.process.stubs()]
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            continue
    return total
