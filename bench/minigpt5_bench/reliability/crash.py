"""kill -9 of a model's stub while requests are in it: how they end, readiness, the watchdog."""

from __future__ import annotations

import os
import signal
import threading
import time

from ..stats import rounded
from .wire import LONG, SHORT, Outcome, grpc_request, grpc_tensors, http_get_status

# Busy in the killed model when its stub is killed. For `vicuna_decoder`: a long text, killed at its
# first text event (900 tokens take about a second here, far longer than the kill). For the others:
# once `image_start` came, the request waits in `minigpt5` for `image_decoder`, which works on its
# 200 steps for seconds.
CRASH_REQUEST = {
    "text_input": "Draw a cat.",
    "max_tokens": 8,
    "force_image": True,
    "num_inference_steps": 200,
    "random_seed": 1,
    "stream": True,
}
CRASH_BUSY_EVENT = "image_start"
CRASH_DECODER_REQUEST = {**LONG, "stream": True}
CRASH_ATTEMPTS = 3  # new requests when one ended before the kill came
# Every answer ended complete this soon after the kill: the killed model had already finished them and
# their last events were still on their way to the client (a busy machine), so nothing was in it.
LATE_KILL_S = 0.5


def _start_busy_requests(server, request: dict, busy_event: str, inflight: int, client_timeout: float):
    """`inflight` streamed requests, returned once each has sent `busy_event` (or ended): their threads,
    {index: (Outcome, end time)} of those that ended, and the lock guarding it."""
    busy = threading.Semaphore(0)
    ended: dict[int, tuple[Outcome, float]] = {}
    lock = threading.Lock()

    def one(index: int) -> None:
        flagged: list[bool] = []

        def on_event(outcome: Outcome) -> None:
            if not flagged and busy_event in outcome.event_types:
                flagged.append(True)
                busy.release()

        outcome = grpc_request(
            server.grpc_url, grpc_tensors({**request, "random_seed": index}), on_event=on_event, timeout=client_timeout
        )
        with lock:
            ended[index] = (outcome, time.monotonic())
        if not flagged:
            busy.release()

    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(inflight)]
    for thread in threads:
        thread.start()
    for _ in threads:
        busy.acquire(timeout=60)
    return threads, ended, lock


def probe_crash(
    server, model: str = "minigpt5", *, inflight: int = 2, client_timeout: float = 120.0, bound_s: float = 60.0
) -> dict:
    """kill -9 of `model`'s stub while `inflight` requests are in it. Every client call has a timeout;
    reports how each in-flight request ended, readiness, and whether/when the server went away."""
    request, busy_event = (
        (CRASH_DECODER_REQUEST, "text") if model == "vicuna_decoder" else (CRASH_REQUEST, CRASH_BUSY_EVENT)
    )
    for attempt in range(1, CRASH_ATTEMPTS + 1):
        threads, ended, lock = _start_busy_requests(server, request, busy_event, inflight, client_timeout)
        with lock:
            if not ended or attempt == CRASH_ATTEMPTS:
                break
        for thread in threads:  # one ended before the kill (a starved client thread on a busy machine): again
            thread.join(client_timeout)
    stubs = {m: pid for pid, m in server.process.stubs().items()}
    if model not in stubs:
        raise RuntimeError(f"no live stub of {model} under tritonserver {server.process.process.pid}: {stubs}")
    busy_at_kill = inflight - len(ended)
    os.kill(stubs[model], signal.SIGKILL)
    killed = time.monotonic()
    ready, exited_after, first_not_ready = [], None, None
    while time.monotonic() - killed < bound_s:
        status = http_get_status(server.http_url, "/v2/health/ready", timeout=2)
        elapsed = time.monotonic() - killed
        ready.append([round(elapsed, 2), status])
        if status != "200" and first_not_ready is None:
            first_not_ready = elapsed
        if exited_after is None and server.process.process.poll() is not None:
            exited_after = elapsed
        with lock:
            done = len(ended) == inflight
        if done and (exited_after is not None or elapsed > 20):
            break
        time.sleep(0.25)
    for thread in threads:
        thread.join(max(0.0, client_timeout - (time.monotonic() - killed)) + 5)
    requests = [
        {**o.brief(), "ended_after_kill_s": rounded(t - killed), "events": o.events}
        for o, t in (ended[i] for i in sorted(ended))
    ]
    after = grpc_request(server.grpc_url, grpc_tensors(SHORT), timeout=30)
    return {
        "model": model,
        "stub_pid": stubs[model],
        "attempts": attempt,
        "busy_at_kill": busy_at_kill,
        "in_flight": requests,
        "hung": inflight - len(ended),
        "ended_with_error": sum(not r["ok"] for r in requests),
        "ended_ok": sum(r["ok"] for r in requests),
        "max_end_after_kill_s": rounded(max((r["ended_after_kill_s"] for r in requests), default=None)),
        "kill_came_late": bool(requests) and all(r["ok"] and r["ended_after_kill_s"] < LATE_KILL_S for r in requests),
        "ready_first_not_200_after_s": rounded(first_not_ready),
        "ready_samples": ready[:12],
        "server_exited_after_s": rounded(exited_after),
        "server_exit_code": server.process.process.poll(),
        "watchdog": server.process.crash,
        "next_request": after.brief(),
    }
