"""`minigpt5-bench reliability`: the flags, the run over the sections, the summary."""

from __future__ import annotations

import argparse
import secrets
import tempfile
import time
from pathlib import Path
from typing import Any

from minigpt5.launcher.local import LocalServer

from ..flags import add_skip, add_weights, name_list
from .bodies import echo_repository, probe_http_body
from .crash import probe_crash
from .disconnects import probe_disconnects
from .inputs import probe_inputs
from .load import probe_overload, probe_soak, probe_timeout
from .security import probe_security
from .wire import SHORT, grpc_request, grpc_tensors

SECTIONS = ("inputs", "security", "overload", "timeout", "disconnect", "soak", "crash", "http_body")
MODELS = ("minigpt5", "vision_encoder", "vicuna_decoder", "image_decoder")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_weights(p)
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto: the servers' models")
    p.add_argument("--limit", type=int, default=2, help="max_inflight_requests of the main server")
    p.add_argument("--burst", type=int, default=12, help="requests released at once in each overload round")
    p.add_argument("--rounds", type=int, default=5, help="overload rounds (at the limit, then a burst)")
    p.add_argument(
        "--sustained-s",
        type=float,
        default=20.0,
        help="seconds of sustained overload (--clients retrying after --backoff-s); 0: none",
    )
    p.add_argument("--clients", type=int, default=12, help="clients of the sustained overload")
    p.add_argument("--backoff-s", type=float, default=0.1, help="a refused client retries after this long")
    p.add_argument(
        "--timeout-s",
        type=float,
        default=2.0,
        help="request_timeout_s of the crash servers, where the timeout is probed first (the main "
        "server keeps the default 600 s: a noisy machine must not fail its soak)",
    )
    p.add_argument("--soak-s", type=float, default=60.0, help="soak duration in seconds")
    p.add_argument("--soak-clients", type=int, default=2, help="soak clients (at most --limit: no refusals)")
    p.add_argument("--soak-warmup-s", type=float, default=15.0, help="RSS growth is measured from this point")
    p.add_argument(
        "--crash-models",
        type=name_list,
        default=["minigpt5", "vicuna_decoder", "image_decoder"],
        help=f"comma-separated models whose stub is killed, one fresh server each ({', '.join(MODELS)})",
    )
    add_skip(p, ", ".join(SECTIONS))


def run(args) -> int:
    from minigpt5.weights.tiny import resolve_weights

    from ..report import Report  # imports torch: not at registration time

    weights = resolve_weights(args.weights)
    report = Report("reliability", skip=args.skip, out=args.out)
    admin_key = secrets.token_urlsafe(16)
    parameters = {"minigpt5": {"max_inflight_requests": str(args.limit)}}
    report.data["settings"] = {
        k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k not in ("handler", "json")
    }
    report.data["weights"] = str(weights)
    tally: dict[str, Any] = {"crashes": 0, "recoveries": 0, "unexpected_deaths": []}
    main_sections = [s for s in ("inputs", "security", "disconnect", "soak", "overload") if s not in args.skip]
    if main_sections:
        server = LocalServer(weights, device=args.device, parameters=parameters, admin_key=admin_key)
        try:
            report.section(
                ("servers", "main"),
                lambda: {"start_s": round(server.start(), 1), "log": str(server.log_path), "parameters": parameters},
                required=True,
            )
            if server.process.process is not None and server.process.process.poll() is None:
                expected = set(server.process.stubs().values())
                probes = {
                    "inputs": lambda: probe_inputs(server),
                    "security": lambda: probe_security(server, admin_key),
                    "overload": lambda: probe_overload(
                        server,
                        limit=args.limit,
                        burst_size=args.burst,
                        rounds=args.rounds,
                        sustained_s=args.sustained_s,
                        clients=args.clients,
                        backoff_s=args.backoff_s,
                    ),
                    "disconnect": lambda: probe_disconnects(server),
                    "soak": lambda: probe_soak(
                        server,
                        duration_s=args.soak_s,
                        clients=min(args.soak_clients, args.limit),
                        warmup_s=args.soak_warmup_s,
                    ),
                }
                for name in main_sections:
                    report.section((name,), probes[name], group=name)
                    if not server.healthy(expected):  # an unplanned crash: count it, restart, go on
                        tally["crashes"] += 1
                        tally["unexpected_deaths"].append(
                            {
                                "after": name,
                                "watchdog": server.process.crash,
                                "exit_code": server.process.process.poll(),
                            }
                        )
                        server.stop()
                        server.start()
                        tally["recoveries"] += 1
        finally:
            report.data["servers"]["main"]["exit_code"] = server.stop()
    # Crash servers: request_timeout_s=--timeout-s; the first one probes the timeout before its kill.
    crash_models = [] if "crash" in args.skip else list(args.crash_models)
    runs = crash_models or ([None] if "timeout" not in args.skip else [])
    for index, model in enumerate(runs):
        with_timeout = index == 0 and "timeout" not in args.skip
        report.section(
            ("crash", model or "none"),
            lambda model=model, with_timeout=with_timeout: _crash_and_recover(
                weights, args.device, model, tally, args.timeout_s, report if with_timeout else None
            ),
            required=True,
        )
    if "http_body" not in args.skip:
        root = Path(tempfile.mkdtemp(prefix="minigpt5-bench-reliability-echo-"))
        repository = echo_repository(root)

        def start_echo():
            echo = LocalServer(weights, device="cpu", repository=repository, name="echo")
            echo.start(timeout=120)
            return echo

        report.section(("http_body",), lambda: probe_http_body(start_echo), group="http_body")
    report.data.update(
        {
            "crashes": tally["crashes"],
            "recoveries": tally["recoveries"],
            "unexpected_deaths": tally["unexpected_deaths"],
        }
    )
    report.data["summary"] = summarize(report.data)
    return report.finish()


def _crash_and_recover(
    weights: Path, device: str, model: str | None, tally: dict, timeout_s: float, timeout_report
) -> dict:
    """A fresh server (request_timeout_s=timeout_s): the timeout probe (into `timeout_report`), the kill
    of `model`'s stub, then the same server started again (what the orchestrator does)."""
    server = LocalServer(
        weights, device=device, name=f"crash-{model}", parameters={"minigpt5": {"request_timeout_s": f"{timeout_s:g}"}}
    )
    try:
        result: dict[str, Any] = {"start_s": round(server.start(), 1), "request_timeout_s": timeout_s}
        if timeout_report is not None:
            timeout_report.section(("timeout",), lambda: probe_timeout(server, timeout_s), group="timeout")
        if model is None:
            return result
        result.update(probe_crash(server, model))
        server.stop()
        restart_started = time.monotonic()
        server.start()
        served = grpc_request(server.grpc_url, grpc_tensors(SHORT), timeout=60)
        tally["recoveries"] += int(served.ok)
        result["recovery"] = {
            "restarted_and_served": served.ok,
            "seconds": round(time.monotonic() - restart_started, 1),
            "how": "tritonserver started again on the same ports (what Kubernetes does when `minigpt5 serve` exits)",
        }
        return result
    finally:
        server.stop()


def summarize(data: dict) -> dict:
    """The headline counts and figures, from the sections present."""

    def get(*path):
        node = data
        for key in path:
            if not isinstance(node, dict) or key not in node:
                return None
            node = node[key]
        return node

    crash_runs = {k: v for k, v in (data.get("crash") or {}).items() if isinstance(v, dict) and "in_flight" in v}
    return {
        "input_classes": get("inputs", "input_classes"),
        "input_cases": get("inputs", "cases"),
        "input_requests": get("inputs", "requests"),
        "errors_returned": get("inputs", "errors_returned"),
        "invalid_arg": get("inputs", "invalid_arg"),
        "field_named": get("inputs", "field_named"),
        "inputs_unexpected": None if get("inputs", "unexpected") is None else len(get("inputs", "unexpected")),
        "restricted_api_refusals": get("security", "refused"),
        "restricted_api_tried": get("security", "tried"),
        "crashes": data.get("crashes"),
        "recoveries": data.get("recoveries"),
        "overload_rejected": get("overload", "overloaded", "rejected"),
        "overload_admitted": get("overload", "overloaded", "admitted"),
        "overload_rejection_p95_ms": get("overload", "overloaded", "rejection_ms", "p95"),
        "overload_admitted_p95_over_at_limit_p95": get("overload", "admitted_p95_over_at_limit_p95"),
        "timeout_status": get("timeout", "grpc", "status"),
        "timeout_ended_after_s": get("timeout", "grpc", "seconds"),
        "grpc_cancel_stopped_after_s": get("disconnect", "grpc_cancel", "stopped_after_s"),
        "grpc_cancel_steps_after": get("disconnect", "grpc_cancel", "decoder_steps_after_disconnect"),
        "sse_close_outcome": get("disconnect", "sse_close", "outcome"),
        "sse_close_stopped_after_s": get("disconnect", "sse_close", "stopped_after_s"),
        "sse_close_steps_after": get("disconnect", "sse_close", "decoder_steps_after_disconnect"),
        "soak_requests": get("soak", "requests"),
        "soak_failures": get("soak", "failures"),
        "soak_rss_growth": get("soak", "rss_growth"),
        "kill9": {
            model: {
                "hung": run_["hung"],
                "ended_with_error": run_["ended_with_error"],
                "server_exited_after_s": run_["server_exited_after_s"],
                "recovered": (run_.get("recovery") or {}).get("restarted_and_served"),
            }
            for model, run_ in crash_runs.items()
        },
    }
