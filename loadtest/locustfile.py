"""Locust load test for MiniGPT-5 on Triton (docs/LOADTEST.md).

    locust -f loadtest/locustfile.py --headless -u 8 -r 2 -t 60s --host http://HOST:8000 \\
        --csv reports/run --html reports/run.html

- Users: ``GrpcStreamUser`` (gRPC ModelStreamInfer on --grpc-url, default HOST:8001) and ``HttpStreamUser``
  (HTTP POST /v2/models/minigpt5/generate_stream, SSE), equally weighted; name one on the command line to
  run only it. Both go through the thin client (minigpt5_client), so they send what applications send
  and read events the same way. Each user sends its next request when the previous answer is complete
  (plus --think-time).
- Request rows: Type = protocol (gRPC, HTTP), Name = kind of request (--mix): end-to-end time of the
  whole streamed answer; the "Size" columns hold completion tokens (text + vokens). The "Aggregated"
  row covers these rows only.
- Extra rows, per protocol: TTFT (time to first text), TTFI (time to first image), E2E (end-to-end,
  every kind), TOK/S (completion tokens / end-to-end seconds of each request: the time columns hold
  tokens per second there, not ms). They are logged straight into their stats entries, so they show in
  the console, CSV and HTML reports, travel from workers to the master, and stay out of "Aggregated".
- At the end: the SLO gate sets the exit code (0 pass, 3 fail): p95 of the E2E rows <= --slo-p95-ms,
  p95 of the TTFT rows <= --slo-ttft-p95-ms (completed answers), failed share of all requests <=
  --max-fail-ratio. The cost report (loadtest/cost.py) is printed and written as JSON (--cost-json).
- A user whose request failed pauses --failure-pause seconds, so a down server is not hammered.
"""

from __future__ import annotations

import csv
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
from locust import User, events, task
from locust import log as locust_log
from locust.runners import MasterRunner, WorkerRunner
from locust.stats import PERCENTILES_TO_REPORT, StatsCSV, StatsEntry

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: `loadtest` is a package
from loadtest.cost import CostAssumptions, compute_cost, rates  # noqa: E402
from loadtest.slo import DEFAULT_MIX, KINDS, SloTargets, evaluate, parse_mix, verdict  # noqa: E402
from minigpt5_client import Client, Final, ImageEvent, TextDelta, preprocess_images  # noqa: E402

GATE_FAILED_EXIT_CODE = 3
GRPC_PORT = 8001
NUM_VOKENS = 8  # generated positions per image: force_image needs max_tokens >= this
PROMPTS = [
    "Tell me a short story about a cat who learns to sail.",
    "Write a bedtime story about a lighthouse keeper and a whale.",
    "Describe a busy market in a mountain village, then show it.",
    "Continue the story: the robot opened the old wooden door and saw",
    "Explain how to bake bread, step by step, with a picture of the result.",
    "A fox and a crow become friends in winter. What happens next?",
    "Plan a picnic by the river and describe the scene.",
    "Tell a story about a child who finds a map in the attic.",
]

# Per-process totals of completed requests; workers send theirs to the master with every stats report.
_usage = {"requests": 0, "completion_tokens": 0, "vokens": 0, "images": 0}
_clock = {"start": None, "stop": None}  # wall time of the run, on the local runner or the master
_summary_lines: list[str] = []  # printed after Locust's own tables
_environment: dict = {}  # the Environment, for listeners that are not given it


# --- options -----------------------------------------------------------------------------------------


def _env(name: str) -> str:
    return "LOCUST_" + name.upper().replace("-", "_")


@events.init_command_line_parser.add_listener
def _add_options(parser):
    def option(name, **kwargs):
        parser.add_argument(f"--{name}", env_var=_env(name), **kwargs)

    # what the users send
    option("grpc-url", default="", help="gRPC address HOST:PORT of the server (default: --host's host, port 8001)")
    option(
        "mix",
        default=DEFAULT_MIX,
        help=f"relative weights of the request kinds {', '.join(KINDS)} (default {DEFAULT_MIX})",
    )
    option(
        "max-tokens",
        type=int,
        default=256,
        help="max_tokens per request: sampled ids, an image's 7 forced vokens come on top (default 256)",
    )
    option("steps", type=int, default=0, help="num_inference_steps of the image decoder (default 0: the server's, 50)")
    option("scheduler", default="", choices=["", "pndm", "dpm"], help="diffusion scheduler (default: the server's)")
    option("image", default="", help="image file sent by image_in requests (default: a built-in 224x224 picture)")
    option("prompts-file", default="", help="text file, one prompt per line (default: built-in story prompts)")
    option("request-timeout", type=float, default=120.0, help="seconds one whole answer may take (default 120)")
    option(
        "think-time",
        type=float,
        default=0.0,
        help="mean pause of a user between answer and next request, seconds (default 0)",
    )
    option("failure-pause", type=float, default=1.0, help="pause of a user after a failed request, seconds (default 1)")
    # the SLO gate
    option(
        "slo-p95-ms",
        type=float,
        default=2000.0,
        help="gate: p95 end-to-end time of the completed answers, ms (default 2000; 0 = off)",
    )
    option(
        "slo-ttft-p95-ms", type=float, default=2000.0, help="gate: p95 time to first token, ms (default 2000; 0 = off)"
    )
    option(
        "max-fail-ratio",
        type=float,
        default=0.01,
        help="gate: largest share of failed requests (default 0.01; 1 = off)",
    )
    # the cost report
    option(
        "gpu-hourly-usd", type=float, default=2.50, help="price of one server (one GPU) per hour, USD (default 2.50)"
    )
    option(
        "target-utilization",
        type=float,
        default=0.5,
        help="average share of the measured throughput a server delivers over a month (default 0.5)",
    )
    option("tokens-per-user", type=float, default=7000.0, help="tokens per user per month (default 7000)")
    option("monthly-users", type=int, default=100_000, help="monthly users to size for (default 100000)")
    option("target-usd-per-1k-tokens", type=float, default=0.15, help="cost target to compare with (default 0.15)")
    option(
        "request-log",
        default="",
        help="append one CSV row per request to this file (unix time, Type, Name, ms, tokens, error): "
        "what loadtest/soak.py bins into p95 per time window; local runs, one file per process",
    )
    option(
        "cost-json",
        default="",
        help="where to write the cost report (default: CSV_PREFIX_cost.json, else next to --html, "
        "else ./minigpt5_cost.json)",
    )


def _opt(environment, name: str, default=None):
    value = getattr(environment.parsed_options, name, None) if environment.parsed_options is not None else None
    return default if value is None else value


@dataclass(frozen=True)
class Settings:
    """The options the users need, checked once per set of values."""

    grpc_url: str
    kinds: tuple[str, ...]
    weights: tuple[float, ...]
    params: dict
    image: np.ndarray
    prompts: tuple[str, ...]
    timeout: float
    think_time: float
    failure_pause: float


_settings_cache: dict[tuple, Settings] = {}


def settings(environment) -> Settings:
    key = tuple(
        _opt(environment, n)
        for n in (
            "grpc_url",
            "mix",
            "max_tokens",
            "steps",
            "scheduler",
            "image",
            "prompts_file",
            "request_timeout",
            "think_time",
            "failure_pause",
        )
    )
    key += (environment.host,)
    if key not in _settings_cache:
        _settings_cache[key] = _build_settings(environment)
    return _settings_cache[key]


def _build_settings(environment) -> Settings:
    mix = parse_mix(_opt(environment, "mix", DEFAULT_MIX))
    max_tokens = int(_opt(environment, "max_tokens", 256))
    if mix["image_out"] > 0 and max_tokens < NUM_VOKENS:
        raise ValueError(
            f"image_out requests need --max-tokens >= {NUM_VOKENS} (an image takes {NUM_VOKENS} "
            f"positions), got {max_tokens}"
        )
    params = {"max_tokens": max_tokens}
    if _opt(environment, "steps", 0):
        params["num_inference_steps"] = int(_opt(environment, "steps"))
    if _opt(environment, "scheduler", ""):
        params["scheduler"] = _opt(environment, "scheduler")
    image_path = _opt(environment, "image", "")
    image = preprocess_images([image_path]) if image_path else _builtin_image()
    prompts_file = _opt(environment, "prompts_file", "")
    prompts = PROMPTS
    if prompts_file:
        prompts = [line.strip() for line in Path(prompts_file).read_text(encoding="utf-8").splitlines() if line.strip()]
        if not prompts:
            raise ValueError(f"--prompts-file {prompts_file} holds no prompt")
    timeout, think_time = float(_opt(environment, "request_timeout", 120.0)), float(_opt(environment, "think_time", 0))
    failure_pause = float(_opt(environment, "failure_pause", 1.0))
    if timeout <= 0 or think_time < 0 or failure_pause < 0:
        raise ValueError("--request-timeout must be > 0, --think-time and --failure-pause >= 0")
    kinds = tuple(k for k in KINDS if mix[k] > 0)
    return Settings(
        grpc_url=_grpc_url(environment),
        kinds=kinds,
        weights=tuple(mix[k] for k in kinds),
        params=params,
        image=image,
        prompts=tuple(prompts),
        timeout=timeout,
        think_time=think_time,
        failure_pause=failure_pause,
    )


def _grpc_url(environment) -> str:
    explicit = _opt(environment, "grpc_url", "")
    if explicit:
        return explicit
    host = environment.host or HttpStreamUser.host
    host = urlsplit(host if "://" in host else f"http://{host}").hostname or "localhost"
    return f"[{host}]:{GRPC_PORT}" if ":" in host else f"{host}:{GRPC_PORT}"


def _builtin_image() -> np.ndarray:
    """A deterministic 224x224 RGB picture (sky, sun, hill): [1, 224, 224, 3] uint8, pre-processed already."""
    y, x = np.mgrid[0:224, 0:224]
    image = np.zeros((224, 224, 3), np.uint8)
    image[..., 0] = 90 + y // 4
    image[..., 1] = 150 + y // 8
    image[..., 2] = 255 - y // 3
    image[(x - 160) ** 2 + (y - 60) ** 2 < 24**2] = (255, 220, 60)
    image[y > 150 + 20 * np.sin(x / 30)] = (60, 140, 60)
    return image[None]


def cost_assumptions(environment) -> CostAssumptions:
    return CostAssumptions(
        gpu_hourly_usd=float(_opt(environment, "gpu_hourly_usd", 2.50)),
        target_utilization=float(_opt(environment, "target_utilization", 0.5)),
        tokens_per_user_month=float(_opt(environment, "tokens_per_user", 7000.0)),
        monthly_users=int(_opt(environment, "monthly_users", 100_000)),
        target_usd_per_1k_tokens=float(_opt(environment, "target_usd_per_1k_tokens", 0.15)),
    )


def slo_targets(environment) -> SloTargets:
    return SloTargets(
        p95_ms=float(_opt(environment, "slo_p95_ms", 2000.0)),
        ttft_p95_ms=float(_opt(environment, "slo_ttft_p95_ms", 2000.0)),
        max_fail_ratio=float(_opt(environment, "max_fail_ratio", 0.01)),
    )


@events.init.add_listener
def _on_init(environment, runner=None, **_kwargs):
    _environment["environment"] = environment
    # Bad options end the run before it starts, with one line, in every process.
    try:
        slo_targets(environment)
        cost_assumptions(environment)
        if not isinstance(runner, MasterRunner):
            settings(environment)
    except (ValueError, OSError) as error:
        sys.stderr.write(f"error: {error}\n")
        sys.exit(2)
    if not isinstance(runner, MasterRunner):
        # Locust runs users as gevent greenlets; grpcio's blocking calls would stall every greenlet of the
        # process (and deadlock the stream's reader thread) unless grpc cooperates with gevent. This must
        # run before the first channel, and here rather than at import: `--processes` forks after the
        # import, and grpc set up before a fork is not usable in the child.
        from grpc.experimental import gevent as grpc_gevent

        grpc_gevent.init_gevent()


# --- the users ---------------------------------------------------------------------------------------


class NoImage(Exception):
    """An image_out request (force_image) whose answer holds no image."""


class _StreamUser(User):
    abstract = True
    protocol = "grpc"
    label = "gRPC"
    host = "http://localhost:8000"  # --host replaces it

    failed = False  # the last request failed

    def wait_time(self) -> float:
        mean = self.settings.think_time
        pause = random.uniform(0.5 * mean, 1.5 * mean) if mean > 0 else 0.0
        # After a failure, pause: a refused request returns in a millisecond, and a user retrying at once
        # would send thousands per second at a down server and eat the CPU of the load generator.
        return max(pause, self.settings.failure_pause) if self.failed else pause

    def on_start(self):
        self.settings = settings(self.environment)
        url = self.settings.grpc_url if self.protocol == "grpc" else self.host
        self.minigpt5 = Client(url, protocol=self.protocol, timeout=self.settings.timeout)

    @task
    def generate(self):
        s = self.settings
        self.ask(random.choices(s.kinds, weights=s.weights)[0])

    def ask(self, kind: str) -> None:
        s = self.settings
        images = s.image if kind == "image_in" else ()
        params = {**s.params, "force_image": kind == "image_out"}
        ttft = ttfi = final = done = exception = None
        start = time.perf_counter()
        try:
            for event in self.minigpt5.stream(random.choice(s.prompts), images=images, **params):
                if isinstance(event, TextDelta):
                    if ttft is None:
                        ttft = time.perf_counter() - start
                elif isinstance(event, ImageEvent):
                    if ttfi is None:
                        ttfi = time.perf_counter() - start
                elif isinstance(event, Final):
                    final, done = event, time.perf_counter()
            if kind == "image_out" and (final is None or not final.usage.get("images")):
                raise NoImage(f"an image_out answer (force_image) holds no image: {final and final.usage}")
        except Exception as error:  # noqa: BLE001 - every failure is the request's; GreenletExit is no Exception
            exception = _detached(error)
        # End-to-end = until the final event (the answer is complete), not the client's teardown after it.
        elapsed = (done if done is not None and exception is None else time.perf_counter()) - start
        usage = final.usage if final is not None and exception is None else {}
        tokens = int(usage.get("completion_tokens", 0))
        self.environment.events.request.fire(
            request_type=self.label,
            name=kind,
            response_time=elapsed * 1000,
            response_length=tokens,
            exception=exception,
            context={},
        )
        self.failed = exception is not None
        if self.failed:
            return
        stats = self.environment.stats
        stats.get(self.label, "E2E").log(elapsed * 1000, tokens)
        if ttft is not None:
            stats.get(self.label, "TTFT").log(ttft * 1000, 0)
        if ttfi is not None:
            stats.get(self.label, "TTFI").log(ttfi * 1000, 0)
        if tokens and elapsed > 0:
            stats.get(self.label, "TOK/S").log(tokens / elapsed, tokens)
        _usage["requests"] += 1
        _usage["completion_tokens"] += tokens
        _usage["vokens"] += int(usage.get("vokens", 0))
        _usage["images"] += int(usage.get("images", 0))


def _detached(error: Exception) -> Exception:
    """The error without its traceback and chained errors.

    Locust keeps every distinct error object until the end of the run; with its traceback it would keep
    the failed request's frames alive, gRPC client included. Such a client is then closed by the garbage
    collector (tritonclient's __del__), at exit or mid-run, and grpcio under gevent can hang there
    for good. Without the frames, the client goes away as soon as the request does.
    """
    error.__traceback__ = error.__context__ = error.__cause__ = None
    return error


class GrpcStreamUser(_StreamUser):
    """gRPC streaming (ModelStreamInfer) on --grpc-url: the Python client's default."""

    protocol = "grpc"
    label = "gRPC"


class HttpStreamUser(_StreamUser):
    """HTTP POST /v2/models/minigpt5/generate_stream on --host, answered with Server-Sent Events."""

    protocol = "http"
    label = "HTTP"


# --- the per-request log (--request-log) ---------------------------------------------------------------

REQUEST_LOG_HEADER = ("time", "type", "name", "ms", "tokens", "error")
_request_log: dict = {}  # {"file": open file, "writer": csv writer} once the first request is logged


@events.request.add_listener
def _log_request(request_type, name, response_time, response_length, exception=None, **_kwargs):
    path = _opt(_environment.get("environment"), "request_log", "") if _environment else ""
    if not path:
        return
    if not _request_log:
        file = open(path, "a", newline="", encoding="utf-8")  # noqa: SIM115 - closed at quit
        writer = csv.writer(file)
        if file.tell() == 0:
            writer.writerow(REQUEST_LOG_HEADER)
        _request_log.update(file=file, writer=writer)
    error = "" if exception is None else f"{type(exception).__name__}: {exception}"[:200]
    _request_log["writer"].writerow(
        (f"{time.time():.3f}", request_type, name, f"{response_time:.1f}", response_length, error)
    )
    _request_log["file"].flush()  # a soak read while it runs, or cut short, still has every row


# --- run totals: workers -> master, the run's wall time -------------------------------------------------


@events.report_to_master.add_listener
def _send_usage(client_id, data, **_kwargs):
    data["minigpt5_usage"] = dict(_usage)
    for key in _usage:
        _usage[key] = 0


@events.worker_report.add_listener
def _receive_usage(client_id, data, **_kwargs):
    for key, value in data.get("minigpt5_usage", {}).items():
        _usage[key] = _usage.get(key, 0) + value


def _reset(**_kwargs):
    for key in _usage:
        _usage[key] = 0
    _clock["start"], _clock["stop"] = time.time(), None


@events.test_start.add_listener
def _on_test_start(environment, **_kwargs):
    if not isinstance(environment.runner, WorkerRunner):
        _reset()


@events.test_stop.add_listener
def _on_test_stop(environment, **_kwargs):
    if not isinstance(environment.runner, WorkerRunner) and _clock["start"] is not None:
        _clock["stop"] = time.time()


events.reset_stats.add_listener(_reset)  # the web UI's "reset stats"


@events.spawning_complete.add_listener
def _on_spawning_complete(**_kwargs):
    # --reset-stats: Locust forgets the ramp-up once every user runs; so do the totals and the clock.
    environment = _environment.get("environment")
    if environment is not None and environment.reset_stats:
        _reset()


# --- the end: gate, cost report ------------------------------------------------------------------------


def merged_entry(stats, method: str) -> StatsEntry:
    """All rows of one Type (e.g. TTFT of every protocol) as one entry."""
    merged = StatsEntry(stats, method, "")
    for (_name, entry_method), entry in list(stats.entries.items()):
        if entry_method == method:
            merged.extend(entry)
    return merged


def _percentiles(entry: StatsEntry) -> dict:
    if entry.num_requests == 0:
        return {"count": 0, "failures": entry.num_failures, "p50": None, "p95": None, "avg": None, "max": None}
    return {
        "count": entry.num_requests,
        "failures": entry.num_failures,
        "p50": entry.get_response_time_percentile(0.5),
        "p95": entry.get_response_time_percentile(0.95),
        "avg": round(entry.avg_response_time, 2),
        "max": round(entry.max_response_time, 2),
    }


def summarize(environment) -> dict:
    """Everything the run measured, the gate's verdict and the cost report, as one JSON-able dict."""
    stats = environment.stats
    total = stats.total  # request rows only, failures included: the extra rows bypass it
    # Latency targets are about answers: the E2E and TTFT rows hold completed requests only (a refused
    # request fails fast and would flatter a percentile); failures are the failure ratio's business.
    e2e, ttft, ttfi = merged_entry(stats, "E2E"), merged_entry(stats, "TTFT"), merged_entry(stats, "TTFI")
    now = time.time()
    start = _clock["start"] or total.start_time or now
    # The end: the runner's stop, or the last answer if later (a master stops before its workers have
    # drained the answers in flight, and their tokens count).
    end = max(_clock["stop"] or now, min(total.last_request_timestamp or 0, now))
    wall_s = max(0.0, end - start)
    tokens_per_s, requests_per_s = rates(_usage["completion_tokens"], _usage["requests"], wall_s)
    targets = slo_targets(environment)
    checks = evaluate(
        targets,
        requests=total.num_requests,
        failures=total.num_failures,
        e2e_p95_ms=e2e.get_response_time_percentile(0.95) if e2e.num_requests else None,
        ttft_p95_ms=ttft.get_response_time_percentile(0.95) if ttft.num_requests else None,
    )
    report = compute_cost(tokens_per_s, requests_per_s, cost_assumptions(environment))
    runner = environment.runner
    return {
        "run": {
            "host": environment.host,
            "grpc_url": _grpc_url(environment),
            "users": _opt(environment, "num_users"),
            "user_classes": sorted(getattr(runner, "final_user_classes_count", {}) or {}),
            "mix": parse_mix(_opt(environment, "mix", DEFAULT_MIX)),
            "max_tokens": int(_opt(environment, "max_tokens", 256)),
            "num_inference_steps": int(_opt(environment, "steps", 0)) or None,
            "wall_s": round(wall_s, 3),
            "requests": total.num_requests,
            "failures": total.num_failures,
            "completed_requests": _usage["requests"],
            "completion_tokens": _usage["completion_tokens"],
            "text_tokens": _usage["completion_tokens"] - _usage["vokens"],
            "vokens": _usage["vokens"],
            "images": _usage["images"],
            "tokens_per_s": round(tokens_per_s, 3),
            "requests_per_s": round(requests_per_s, 4),
        },
        "latency_ms": {"e2e": _percentiles(e2e), "ttft": _percentiles(ttft), "ttfi": _percentiles(ttfi)},
        "rows": [
            {"type": entry.method, "name": entry.name, **_percentiles(entry)}
            for entry in sorted(stats.entries.values(), key=lambda e: (e.method, e.name))
        ],
        "slo": {**verdict(targets, checks), "lines": [c.line() for c in checks]},
        "cost": _finite(report.to_dict()),
        "cost_lines": report.lines(),
    }


def _finite(value):
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def cost_json_path(environment) -> str:
    explicit = _opt(environment, "cost_json", "")
    if explicit:
        return explicit
    csv_prefix = _opt(environment, "csv_prefix", "")
    if csv_prefix:
        return f"{csv_prefix}_cost.json"
    html = _opt(environment, "html_file", "")
    if html:
        return f"{os.path.splitext(html)[0]}_cost.json"
    return "minigpt5_cost.json"


def write_final_csv(environment) -> None:
    """Rewrite --csv's stats, failures and exceptions files with the final numbers: Locust refreshes them
    once a second while the run goes on and not at the end, so they can miss the last second."""
    prefix = _opt(environment, "csv_prefix", "")
    if not prefix:
        return
    writer = StatsCSV(environment, PERCENTILES_TO_REPORT)
    for suffix, write in (
        ("_stats.csv", writer.requests_csv),
        ("_failures.csv", writer.failures_csv),
        ("_exceptions.csv", writer.exceptions_csv),
    ):
        with open(f"{prefix}{suffix}", "w", newline="", encoding="utf-8") as file:
            write(csv.writer(file))


@events.quitting.add_listener
def _on_quitting(environment, **_kwargs):
    if isinstance(environment.runner, WorkerRunner):
        return
    try:
        write_final_csv(environment)
    except OSError as error:
        sys.stderr.write(f"warning: could not rewrite the CSV reports: {error}\n")
    summary = summarize(environment)
    passed = summary["slo"]["passed"]
    path = cost_json_path(environment)
    try:
        if os.path.dirname(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
        Path(path).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        written = f"written to {path}"
    except OSError as error:
        written = f"NOT written ({error})"
    run = summary["run"]
    _summary_lines[:] = [
        "",
        f"MiniGPT-5 load test: {run['completed_requests']} answers in {run['wall_s']:.1f} s, "
        f"{run['completion_tokens']} tokens ({run['vokens']} vokens, {run['images']} images)",
        f"SLO gate: {'PASSED' if passed else 'FAILED'}",
        *(f"  {line}" for line in summary["slo"]["lines"]),
        "Cost report:",
        *(f"  {line}" for line in summary["cost_lines"]),
        f"  (JSON {written})",
        "",
    ]
    # The gate decides the exit code (Locust's own rule would fail on any single error); a crashed
    # greenlet still exits 2, as Locust does.
    if locust_log.unhandled_greenlet_exception:
        return
    environment.process_exit_code = 0 if passed else GATE_FAILED_EXIT_CODE


@events.quit.add_listener
def _on_quit(**_kwargs):
    if _request_log:
        _request_log["file"].close()
    if _summary_lines:
        print("\n".join(_summary_lines), flush=True)
