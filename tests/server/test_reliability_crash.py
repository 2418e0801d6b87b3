"""Per-request timeouts, and kill -9 of a model's stub under light load, on a server of this
module's own (request_timeout_s=2; the kill ends it). Every client call has a timeout.

What Triton 2.51 does by itself when a python stub dies: nothing. It neither restarts the stub nor
reports the model unready; requests in flight in it hang forever and later ones fail. TritonProcess's
watchdog (minigpt5/launcher/process.py) therefore stops tritonserver when a stub dies, so that clients
get an error at once and Kubernetes restarts the container (`minigpt5 serve` exits with code 3)."""

from __future__ import annotations

import json

import pytest

from minigpt5_bench.reliability.crash import probe_crash
from minigpt5_bench.reliability.load import probe_timeout
from support.servers import start_server

pytestmark = pytest.mark.server

TIMEOUT_S = 2.0
KILL_ATTEMPTS = 2


@pytest.fixture(scope="module")
def doomed_server(tiny_weights, tmp_path_factory):
    server = start_server(
        tiny_weights,
        tmp_path_factory.mktemp("triton-crash"),
        parameters={
            "minigpt5": {"request_timeout_s": f"{TIMEOUT_S:g}"},
            # the killed requests must still be decoding: with no prompt from the
            # cache their greedy answers are the long ones this test was made for
            "vicuna_decoder": {"prefix_cache_tokens": "0"},
        },
    )
    yield server
    server.process.stop()


def test_a_request_longer_than_request_timeout_s_ends_unavailable(doomed_server):
    result = probe_timeout(doomed_server, TIMEOUT_S)
    print(json.dumps(result, indent=1))
    grpc = result["grpc"]
    assert grpc["status"] == "UNAVAILABLE" and grpc["names_parameter"], grpc
    assert TIMEOUT_S <= grpc["seconds"] < TIMEOUT_S + 15, grpc  # bounded; the figure is reported
    assert result["http"]["names_parameter"] and not result["http"]["ok"], result["http"]
    assert result["served_after"]


def test_kill_9_of_the_decoder_stub_ends_every_request_and_the_server(doomed_server):
    """The two requests are decoding in the killed `vicuna_decoder` process; `minigpt5`'s link call to
    it never returns (Triton 2.51), so the watchdog must end them."""
    for attempt in range(1, KILL_ATTEMPTS + 1):
        result = probe_crash(doomed_server, "vicuna_decoder", inflight=2, client_timeout=90, bound_s=60)
        print(json.dumps(result, indent=1))
        if not result["kill_came_late"] or attempt == KILL_ATTEMPTS:
            break
        doomed_server.stop()  # the decoder had finished both answers: again, on a fresh server
        doomed_server.start(timeout=300)
    assert result["busy_at_kill"] == 2
    assert result["hung"] == 0 and result["ended_with_error"] == 2, result["in_flight"]
    assert result["max_end_after_kill_s"] < 45, result["in_flight"]  # watchdog poll + grace, not a hang
    assert result["server_exited_after_s"] is not None, "the server kept running with a dead stub"
    assert "vicuna_decoder" in (result["watchdog"] or ""), result
    assert not result["next_request"]["ok"] and result["next_request"]["seconds"] < 30  # refused, not hung
