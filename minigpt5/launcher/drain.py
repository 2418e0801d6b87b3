"""Graceful shutdown: let the answers in flight finish before tritonserver gets SIGTERM.

Triton 2.51 cannot drain `minigpt5` by itself. The model is decoupled: its `execute` hands each
request to a thread and returns at once, so on SIGTERM Triton counts no inference in flight, turns
not ready and refuses every new inference, the BLS calls of the answers still streaming included
("vicuna_decoder call failed: ... Server not ready"). Every rollout or scale-down would cut the
answers in flight.

So `minigpt5 serve` drains first (TritonProcess.stop): it raises the shutdown flag (contract.py) in
the served copy of the `minigpt5` model's directory, the model then refuses new requests (UNAVAILABLE,
"shutting down"), and serve polls `minigpt5_inflight_requests` on the metrics port until it is 0 or
the exit timeout has passed. Only then does tritonserver get SIGTERM.
"""

from __future__ import annotations

import time
import urllib.error
import urllib.request

INFLIGHT_METRIC = 'minigpt5_inflight_requests{model="minigpt5"}'
POLL_S = 0.25
# The in-flight slot is freed just before the final response is queued for sending: leave the
# response writer this long to hand it to Triton after the count reaches 0.
SETTLE_S = 1.0


def inflight_requests(metrics_url: str) -> int | None:
    """`minigpt5`'s requests in flight from Triton's /metrics; None when the endpoint is off or the
    metric missing. Raises TimeoutError when it is slow (a busy CPU server can take many seconds)."""
    try:
        with urllib.request.urlopen(metrics_url, timeout=5) as reply:
            text = reply.read().decode()
    except urllib.error.URLError as exc:
        if isinstance(exc.reason, TimeoutError):
            raise exc.reason from None
        return None
    except ConnectionError:
        return None
    for line in text.splitlines():
        if line.startswith(INFLIGHT_METRIC + " "):
            return int(float(line.rsplit(" ", 1)[1]))
    return None


def wait_drained(metrics_url: str, deadline: float, report=None, alive=lambda: True) -> bool:
    """Until no request is in flight (True), or time.monotonic() passes `deadline` or `alive()` turns
    false (False). `report(line)` hears about the wait every 10 s."""
    next_report, waited = time.monotonic(), False
    while alive():
        try:
            count = inflight_requests(metrics_url)
        except TimeoutError:
            count = -1  # unknown: ask again
        if count is None:
            if report:
                report(
                    f"minigpt5: cannot read {INFLIGHT_METRIC} from {metrics_url}; not waiting for requests in flight"
                )
            return False
        if count == 0:
            if waited:
                time.sleep(SETTLE_S)
            return True
        now = time.monotonic()
        if now >= deadline:
            if report:
                report(
                    f"minigpt5: {count if count > 0 else 'some'} request(s) still in flight at the exit "
                    f"timeout; stopping anyway"
                )
            return False
        if report and now >= next_report and count > 0:
            report(
                f"minigpt5: draining: {count} request(s) in flight, up to {deadline - now:.0f} s more; "
                f"new requests are refused"
            )
            next_report = now + 10
        waited = True
        time.sleep(POLL_S)
    return False
