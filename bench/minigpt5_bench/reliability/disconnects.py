"""Disconnects: a gRPC stream cancelled and an SSE connection closed mid-answer."""

from __future__ import annotations

import json
import socket
import time

from ..stats import rounded
from .measure import metric, outcomes, scrape
from .wire import LONG, SHORT, generate_path, grpc_request, grpc_tensors


def _wait_outcome(metrics_url: str, before: dict, bound_s: float) -> tuple[str | None, float]:
    """Poll the outcome counters until one moves; (outcome, seconds) or (None, bound)."""
    started = time.monotonic()
    while time.monotonic() - started < bound_s:
        now = outcomes(metrics_url)
        moved = [o for o in now if now[o] > before.get(o, 0)]
        if moved:
            return moved[0], time.monotonic() - started
        time.sleep(0.05)
    return None, bound_s


def _decoder_steps(metrics_url: str) -> float:
    return metric(scrape(metrics_url), "minigpt5_decoder_batch_size_count")


def probe_disconnects(server, params: dict | None = None, events_before: int = 3, bound_s: float = 30.0) -> dict:
    return {
        "grpc_cancel": probe_grpc_cancel(server, params, events_before, bound_s),
        "sse_close": probe_sse_close(server, params, events_before, bound_s),
    }


def _after_stop(
    server,
    steps_at_disconnect: float,
    outcome: str | None,
    stopped_after_s: float,
    max_tokens: int,
    steps_at_start: float,
) -> dict:
    steps_end = _decoder_steps(server.metrics_url)
    values = scrape(server.metrics_url)
    follow_up = grpc_request(server.grpc_url, grpc_tensors(SHORT), timeout=60)
    return {
        "outcome": outcome,
        "stopped_after_s": rounded(stopped_after_s),
        "decoder_steps_before_disconnect": int(steps_at_disconnect - steps_at_start),
        "decoder_steps_after_disconnect": int(steps_end - steps_at_disconnect),
        "max_tokens": max_tokens,
        "inflight_after": metric(values, "minigpt5_inflight_requests"),
        "next_request_ok": follow_up.ok,
        "next_request_s": rounded(follow_up.seconds),
    }


def probe_grpc_cancel(server, params: dict | None = None, events_before: int = 3, bound_s: float = 30.0) -> dict:
    """The client cancels its stream after a few events: when does the request stop, and how many decoder
    steps ran after the cancel (the decoder runs only this request here)."""
    params = {**(params or LONG), "stream": True}
    before, steps_start = outcomes(server.metrics_url), _decoder_steps(server.metrics_url)
    outcome = grpc_request(server.grpc_url, grpc_tensors(params), cancel_after_events=events_before, timeout=60)
    steps_cancel = _decoder_steps(server.metrics_url)
    ended, seconds = _wait_outcome(server.metrics_url, before, bound_s)
    return {
        "events_read": outcome.events,
        **_after_stop(server, steps_cancel, ended, seconds, params["max_tokens"], steps_start),
    }


def probe_sse_close(server, params: dict | None = None, events_before: int = 3, bound_s: float = 30.0) -> dict:
    """The client closes its SSE connection after a few events (Triton 2.51's HTTP frontend cancels the
    request when the connection goes: http_server.cc RequestFiniHook)."""
    params = {**(params or LONG), "stream": True}
    host, _, port = server.http_url.rpartition(":")
    body = json.dumps(params).encode()
    before, steps_start = outcomes(server.metrics_url), _decoder_steps(server.metrics_url)
    sock = socket.create_connection((host, int(port)), timeout=60)
    try:
        sock.sendall(
            b"POST %s HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
            % (generate_path(True).encode(), host.encode(), len(body), body)
        )
        received = b""
        while received.count(b"data:") < events_before:
            chunk = sock.recv(65536)
            if not chunk:
                break
            received += chunk
    finally:
        sock.close()
    steps_close = _decoder_steps(server.metrics_url)
    ended, seconds = _wait_outcome(server.metrics_url, before, bound_s)
    return {
        "events_read": received.count(b"data:"),
        **_after_stop(server, steps_close, ended, seconds, params["max_tokens"], steps_start),
    }
