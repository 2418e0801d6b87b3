"""Clients that go away mid-answer, against a server of this module's own: Triton 2.51's gRPC
frontend has cancellation races (fixed upstream in 25.x), so these tests never share the session
server."""

from __future__ import annotations

import queue
import time
import urllib.request

import pytest
import tritonclient.grpc as grpcclient

from support.servers import start_server
from support.serving_helpers import assemble, grpc_inputs, grpc_stream

pytestmark = pytest.mark.server


@pytest.fixture(scope="module")
def own_server(tiny_weights, tmp_path_factory):
    server = start_server(tiny_weights, tmp_path_factory.mktemp("triton-disconnects"))
    yield server
    server.process.stop()


def _counter(metrics_url: str, outcome: str) -> float:
    text = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("minigpt5_requests_total{") and f'outcome="{outcome}"' in line
    )


# Greedy without repetition penalty: the tiny random weights loop and never stop by themselves, so this
# request runs to max_tokens whatever the defaults or float rounding (checked in the test).
LONG = {"text_input": "A very long story.", "max_tokens": 900, "temperature": 0.0, "repetition_penalty": 1.0}


def test_cancelled_grpc_stream_stops_decoding(own_server, reference_pipeline):
    """The client cancels mid-answer: the BLS sees it, aborts the decoder row by id, and the request
    ends as `cancelled` instead of running to its natural end."""
    natural = reference_pipeline.run(
        LONG["text_input"], max_tokens=LONG["max_tokens"], temperature=0.0, repetition_penalty=1.0
    )
    assert natural.usage.completion_tokens > 500, "pick a seed whose answer runs long"
    before = _counter(own_server.metrics_url, "cancelled")
    responses: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(own_server.grpc_url)
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    client.async_stream_infer("minigpt5", grpc_inputs({**LONG, "stream": True}))
    for _ in range(3):
        result, error = responses.get(timeout=60)
        assert error is None, error
    cancelled_at = time.monotonic()
    client.stop_stream(cancel_requests=True)
    client.close()
    while _counter(own_server.metrics_url, "cancelled") == before:
        assert _counter(own_server.metrics_url, "ok") == 0, "the request ran to its end: not stopped"
        assert time.monotonic() - cancelled_at < 20, f"the cancelled request was not stopped\n{own_server.log_tail()}"
        time.sleep(0.2)
    stopped_after = time.monotonic() - cancelled_at
    # The decoder is free again: a new request is served at once.
    answer = assemble(grpc_stream(own_server.grpc_url, {"text_input": "Hello", "max_tokens": 8, "random_seed": 2}))
    assert answer["text"] and answer["usage"]["completion_tokens"] <= 8
    print(f"cancelled request stopped {stopped_after:.2f}s after the client cancelled")
