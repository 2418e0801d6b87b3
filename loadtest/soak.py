"""A soak: a steady load below capacity for a long time, and what it does to the server (docs/RELIABILITY.md,
"The 30-minute soak").

    python -m loadtest.soak --host http://127.0.0.1:8000 --server-pid PID --duration 30m \\
        --users 2 --think-time 2 --out reports/soak

Runs the project's Locust load test (loadtest/locustfile.py) headless with a fixed number of users, all
started at once, each pausing --think-time seconds on average between answers; the request mix is
Locust's (--mix: text, image in, image out, over gRPC and HTTP). Meanwhile it samples the resident
memory (RSS) of tritonserver and of every python-backend stub, and the machine's load average.

--server-pid is tritonserver's PID or that of a process above it (`minigpt5 serve`); the processes are
read from /proc, so the soak runs on the server's machine (or in its pod). Options after `--` go to
Locust as they are.

Writes into --out: Locust's CSV and HTML reports (soak_*), requests.csv (one row per request),
soak.json (the summary: requests, failures, p95 per --window, RSS per process at start and end, load
average) and prints the summary. Exit code 0 when there was at least one request, none failed and
tritonserver and the same stubs are alive at the end; 1 otherwise; 2 for bad options.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
LOCUSTFILE = ROOT / "loadtest" / "locustfile.py"
DURATION_UNITS = {"s": 1, "m": 60, "h": 3600}


def parse_duration(text: str) -> float:
    """'90s', '30m', '1h', '1h30m' or plain seconds -> seconds (> 0)."""
    text = text.strip()
    if re.fullmatch(r"\d+(\.\d+)?", text):
        seconds = float(text)
    elif re.fullmatch(r"(\d+[smh])+", text):
        seconds = sum(int(n) * DURATION_UNITS[u] for n, u in re.findall(r"(\d+)([smh])", text))
    else:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (e.g. 90s, 30m, 1h)")
    if seconds <= 0:
        raise argparse.ArgumentTypeError(f"a duration must be > 0, got {text!r}")
    return seconds


# --- the server's processes ------------------------------------------------------------------------------


def server_processes(pid: int) -> dict[str, psutil.Process]:
    """{"tritonserver": process, "stub:MODEL": process, ...} for tritonserver at or below `pid`.
    A python-backend stub's first argument is its `<repository>/<model>/<version>/model.py`."""
    root = psutil.Process(pid)
    triton = next((p for p in [root, *root.children(recursive=True)] if p.name() == "tritonserver"), None)
    if triton is None:
        raise ValueError(f"--server-pid {pid}: no tritonserver process at or below it")
    found = {"tritonserver": triton}
    for child in triton.children():
        try:
            argv = child.cmdline()
            if child.status() != psutil.STATUS_ZOMBIE and len(argv) > 1 and argv[1].endswith("model.py"):
                found[f"stub:{Path(argv[1]).parent.parent.name}"] = child
        except psutil.Error:
            continue  # gone meanwhile
    return found


def rss_mb(processes: dict[str, psutil.Process]) -> dict[str, float | None]:
    """RSS of each process in MiB; None for one that is gone."""
    sizes = {}
    for name, process in processes.items():
        try:
            sizes[name] = round(process.memory_info().rss / 2**20, 1)
        except psutil.Error:
            sizes[name] = None
    return sizes


class Sampler(threading.Thread):
    """Every `every_s` seconds: RSS of each process and the 1-minute load average."""

    def __init__(self, processes: dict[str, psutil.Process], every_s: float):
        super().__init__(name="soak-sampler", daemon=True)
        self.processes, self.every_s = processes, every_s
        self.samples: list[dict] = []
        self.done = threading.Event()

    def sample(self) -> None:
        self.samples.append(
            {"time": round(time.time(), 1), "load1": round(os.getloadavg()[0], 2), "rss_mb": rss_mb(self.processes)}
        )

    def run(self) -> None:
        while not self.done.wait(self.every_s):
            self.sample()


# --- the run --------------------------------------------------------------------------------------------


def locust_command(args, extra: list[str]) -> list[str]:
    users = str(args.users)
    command = [
        sys.executable,
        "-m",
        "locust",
        "-f",
        str(LOCUSTFILE),
        "--headless",
        "-u",
        users,
        "-r",
        users,
        "-t",
        f"{int(math.ceil(args.duration))}s",
        "--stop-timeout",
        str(int(args.request_timeout)),
        "--host",
        args.host,
        "--think-time",
        f"{args.think_time:g}",
        "--request-timeout",
        f"{args.request_timeout:g}",
        "--csv",
        str(args.out / "soak"),
        "--csv-full-history",
        "--html",
        str(args.out / "soak.html"),
        "--request-log",
        str(args.out / "requests.csv"),
        # The soak's own verdict (failures, processes) decides; Locust's latency gate is off.
        "--slo-p95-ms",
        "0",
        "--slo-ttft-p95-ms",
        "0",
        "--max-fail-ratio",
        "1",
    ]
    if args.grpc_url:
        command += ["--grpc-url", args.grpc_url]
    return command + extra


def read_requests(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with path.open(newline="", encoding="utf-8") as file:
        return [
            {
                "time": float(r["time"]),
                "ms": float(r["ms"]),
                "kind": r["name"],
                "protocol": r["type"],
                "error": r["error"],
            }
            for r in csv.DictReader(file)
        ]


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (the value at rank ceil(q/100 * n))."""
    if not values:
        return None
    values = sorted(values)
    return values[max(0, math.ceil(q / 100 * len(values)) - 1)]


def windows(requests: list[dict], start: float, duration_s: float, window_s: float) -> list[dict]:
    """Requests, failures, p50 and p95 end-to-end ms of the completed ones, per window of the run, by
    the time each request ended; the answers still in flight when the load stops count in the last."""
    rows = []
    count = max(1, math.ceil(duration_s / window_s - 1e-9))
    for index in range(count):
        lo, hi = start + index * window_s, start + (index + 1) * window_s
        inside = [r for r in requests if lo <= r["time"] < hi or (index == count - 1 and r["time"] >= hi)]
        ok = [r["ms"] for r in inside if not r["error"]]
        rows.append(
            {
                "from_s": round(index * window_s),
                "to_s": round(min((index + 1) * window_s, duration_s)),
                "requests": len(inside),
                "failures": len(inside) - len(ok),
                "p50_ms": percentile(ok, 50),
                "p95_ms": percentile(ok, 95),
            }
        )
    return rows


def clock(seconds: float) -> str:
    return f"{int(seconds) // 60}:{int(seconds) % 60:02d}"


def summarize(
    requests: list[dict],
    samples: list[dict],
    start: float,
    end: float,
    window_s: float,
    alive_at_end: dict[str, bool],
    settings: dict,
) -> dict:
    ok = [r["ms"] for r in requests if not r["error"]]
    first, last = samples[0], samples[-1]
    by_kind: dict[str, int] = {}
    for r in requests:
        by_kind[f"{r['protocol']} {r['kind']}"] = by_kind.get(f"{r['protocol']} {r['kind']}", 0) + 1
    loads = [s["load1"] for s in samples]
    failures = [r for r in requests if r["error"]]
    passed = bool(requests) and not failures and all(alive_at_end.values())
    return {
        "settings": settings,
        "duration_s": round(end - start, 1),
        "requests": len(requests),
        "failures": len(failures),
        "by_kind": dict(sorted(by_kind.items())),
        "failure_samples": [{k: r[k] for k in ("protocol", "kind", "error")} for r in failures[:5]],
        "requests_per_s": round(len(requests) / max(end - start, 1e-9), 3),
        "p50_ms": percentile(ok, 50),
        "p95_ms": percentile(ok, 95),
        "windows": windows(requests, start, settings["duration_s"], window_s),
        "rss_mb": {name: {"start": first["rss_mb"][name], "end": last["rss_mb"][name]} for name in first["rss_mb"]},
        "alive_at_end": alive_at_end,
        "load1": {
            "start": first["load1"],
            "end": last["load1"],
            "mean": round(sum(loads) / len(loads), 2),
            "max": max(loads),
        },
        "rss_samples": samples,
        "passed": passed,
    }


def markdown(summary: dict) -> str:
    """The summary as the tables docs/RELIABILITY.md records."""
    lines = [
        f"{summary['requests']} requests in {summary['duration_s']:.0f} s "
        f"({summary['requests_per_s']} per s), {summary['failures']} failures; "
        f"p50 {summary['p50_ms']} ms, p95 {summary['p95_ms']} ms; load average (1 min) "
        f"{summary['load1']['start']} at start, mean {summary['load1']['mean']}, max {summary['load1']['max']}",
        "",
        "| window (min:s) | requests | failures | p50 ms | p95 ms |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {clock(w['from_s'])}–{clock(w['to_s'])} | {w['requests']} | {w['failures']} | "
        f"{w['p50_ms']} | {w['p95_ms']} |"
        for w in summary["windows"]
    ]
    lines += ["", "| process | RSS at start, MiB | RSS at end, MiB |", "|---|---|---|"]
    lines += [f"| {name} | {rss['start']} | {rss['end']} |" for name, rss in summary["rss_mb"].items()]
    return "\n".join(lines)


def run(args, extra: list[str]) -> int:
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "requests.csv").unlink(missing_ok=True)
    processes = server_processes(args.server_pid)
    pids = {name: p.pid for name, p in processes.items()}
    sampler = Sampler(processes, args.sample_every)
    sampler.sample()
    start = time.time()
    sampler.start()
    locust = subprocess.run(locust_command(args, extra), cwd=ROOT)
    end = time.time()
    sampler.done.set()
    sampler.join()
    sampler.sample()
    now = server_processes(args.server_pid) if psutil.pid_exists(args.server_pid) else {}
    alive = {name: name in now and now[name].pid == pid for name, pid in pids.items()}
    settings = {
        "host": args.host,
        "grpc_url": args.grpc_url or None,
        "users": args.users,
        "think_time_s": args.think_time,
        "duration_s": args.duration,
        "window_s": args.window,
        "locust_options": extra,
        "locust_exit_code": locust.returncode,
        "cpus": os.cpu_count(),
    }
    summary = summarize(
        read_requests(args.out / "requests.csv"), sampler.samples, start, end, args.window, alive, settings
    )
    (args.out / "soak.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    print(markdown(summary))
    print(f"soak: {'PASSED' if summary['passed'] else 'FAILED'} (summary in {args.out / 'soak.json'})", flush=True)
    if locust.returncode not in (0, 3):  # 3 = Locust's gate, off here; anything else is Locust's own error
        return 1
    return 0 if summary["passed"] else 1


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m loadtest.soak",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Options after -- go to Locust (e.g. --mix, --max-tokens, --steps).",
    )
    p.add_argument("--host", required=True, help="the server's HTTP base URL, e.g. http://127.0.0.1:8000")
    p.add_argument("--grpc-url", default="", help="gRPC HOST:PORT (default: --host's host, port 8001)")
    p.add_argument(
        "--server-pid",
        type=int,
        required=True,
        help="PID of tritonserver or of a process above it (`minigpt5 serve`), on this machine",
    )
    p.add_argument(
        "--duration",
        type=parse_duration,
        default=parse_duration("30m"),
        help="how long the load runs: 90s, 30m, 1h (default 30m)",
    )
    p.add_argument("--users", type=int, default=2, help="simulated users, all started at once (default 2)")
    p.add_argument(
        "--think-time",
        type=float,
        default=2.0,
        help="mean pause of a user between an answer and its next request, seconds (default 2)",
    )
    p.add_argument("--request-timeout", type=float, default=120.0, help="seconds one answer may take (default 120)")
    p.add_argument(
        "--window",
        type=parse_duration,
        default=parse_duration("5m"),
        help="p95 is reported per window of this length (default 5m)",
    )
    p.add_argument(
        "--sample-every",
        type=parse_duration,
        default=parse_duration("10s"),
        help="RSS and load-average sampling interval (default 10s)",
    )
    p.add_argument("--out", type=Path, default=Path("reports/soak"), help="report directory (default reports/soak)")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    ours = argv[: argv.index("--")] if "--" in argv else argv
    args = parser().parse_args(ours)
    if args.users < 1 or args.think_time < 0 or args.request_timeout <= 0:
        parser().error("--users must be >= 1, --think-time >= 0, --request-timeout > 0")
    try:
        return run(args, extra)
    except (ValueError, psutil.Error) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
