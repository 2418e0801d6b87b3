"""Reliability under load, on a server of this module's own (max_inflight_requests=2): admission control,
clients that go away (gRPC cancel, SSE close) and a soak. Timing is reported, not asserted, except
as loose bounds that only catch hangs; the counts are asserted.

The soak runs 60 s (MINIGPT5_SOAK_S=600 for a longer one). Every test first checks that the server
is still the one it started with: a server that died (a stub, or tritonserver) fails the test."""

from __future__ import annotations

import json
import os

import pytest

from minigpt5_bench.reliability.disconnects import probe_disconnects
from minigpt5_bench.reliability.load import probe_overload, probe_soak
from minigpt5_bench.reliability.measure import outcomes
from minigpt5_bench.reliability.wire import SHORT, STEADY, grpc_request, grpc_tensors
from support.servers import start_server

pytestmark = pytest.mark.server

LIMIT = 2
SOAK_S = float(os.environ.get("MINIGPT5_SOAK_S", "60"))


def assert_the_server_lives(server, during: str) -> None:
    process = server.process
    assert process.process.poll() is None and not process.crash, (
        f"the server died during {during}: {process.crash or f'tritonserver exit {process.process.poll()}'}\n"
        f"{server.log_tail(15)}"
    )


@pytest.fixture(scope="module")
def limited_server(tiny_weights, tmp_path_factory):
    server = start_server(
        tiny_weights,
        tmp_path_factory.mktemp("triton-reliability"),
        parameters={"minigpt5": {"max_inflight_requests": str(LIMIT)}},
    )
    yield server
    server.process.stop()


def test_excess_requests_are_refused_at_once_and_admitted_ones_complete(limited_server):
    assert_the_server_lives(limited_server, "an earlier test")
    result = probe_overload(limited_server, limit=LIMIT, burst_size=8, rounds=3, params=STEADY)
    print(json.dumps(result, indent=1))
    assert_the_server_lives(limited_server, "the overload bursts")
    at_limit, loaded = result["at_limit"], result["overloaded"]
    assert at_limit["ok"] == at_limit["requests"] == 3 * LIMIT, at_limit  # at the limit nothing is refused
    assert loaded["other_errors"] == 0, loaded["other_error_samples"]
    assert loaded["admitted"] + loaded["rejected"] == loaded["requests"] == 3 * 8
    # Each burst: the limit is admitted, the rest refused (one more may slip in as an admitted one ends).
    assert 3 * LIMIT <= loaded["admitted"] <= 3 * (LIMIT + 1), loaded
    assert "max_inflight_requests" in loaded["rejection_message"]
    # "Fast": a refusal costs no generation (compared in the same run, not against a wall-clock number).
    assert loaded["rejection_ms"]["p50"] / 1000 < loaded["admitted_latency"]["p50_s"]
    # HTTP: refused too, naming the limit. Triton 2.51's /generate reports every model error as 400
    # (http_server.cc reads the error code after freeing it), so 503 cannot come from the model there.
    burst = result["http_burst"]
    assert burst["refused"] > 0 and burst["ok"] + burst["refused"] == burst["requests"], burst
    assert set(burst["refused_status"]) <= {"400", "503"}
    assert result["inflight_after"] == 0
    assert grpc_request(limited_server.grpc_url, grpc_tensors(SHORT)).ok


def test_a_client_that_goes_away_stops_its_request(limited_server):
    """gRPC: the stream is cancelled; SSE: the connection is closed (Triton 2.51 cancels the request
    when an HTTP connection closes). Either way the BLS aborts the decoder row within its 0.1 s check."""
    assert_the_server_lives(limited_server, "an earlier test")
    result = probe_disconnects(limited_server)
    print(json.dumps(result, indent=1))
    assert_the_server_lives(limited_server, "the disconnects")
    for how, run in result.items():
        assert run["outcome"] == "cancelled", (how, run)
        assert run["stopped_after_s"] < 10, (how, run)  # a hang bound, the figure is reported
        ran = run["decoder_steps_before_disconnect"] + run["decoder_steps_after_disconnect"]
        assert ran < run["max_tokens"], (how, run)  # it did not run to the end
        assert run["inflight_after"] == 0 and run["next_request_ok"], (how, run)


def test_soak_has_no_failures_and_rss_stays_flat(limited_server):
    assert_the_server_lives(limited_server, "an earlier test")
    before = outcomes(limited_server.metrics_url)
    result = probe_soak(limited_server, duration_s=SOAK_S, clients=LIMIT, warmup_s=min(15.0, SOAK_S / 4))
    print(json.dumps({k: v for k, v in result.items() if k != "rss_mb_samples"}, indent=1))
    assert_the_server_lives(
        limited_server, f"the soak ({result['requests']} requests, {result['server_died_after_s']} s in)"
    )
    assert result["requests"] > 0 and result["failures"] == 0, result["failure_samples"]
    assert set(result["by_kind"]) == {"grpc_text", "sse_text", "grpc_image", "grpc_input_image"}
    assert result["rss_growth"] < 0.05, result["rss_mb_samples"]
    after = outcomes(limited_server.metrics_url)
    assert after["ok"] - before["ok"] == result["requests"]
    assert after["error"] == before["error"] and after["overloaded"] == before["overloaded"]
