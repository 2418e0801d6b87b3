"""The client's connection options against the real tritonserver: TLS (grpcs:// and https://, through a
TLS proxy signed by a test CA), one gRPC channel per client, extra headers and a bearer token, retries
of a refused request only before its first event, and mid-stream errors classified over HTTP too."""

from __future__ import annotations

import concurrent.futures
import threading
import urllib.request
from concurrent import futures

import grpc
import pytest

from minigpt5.launcher.local import free_port
from minigpt5_client import Client
from minigpt5_client.errors import Overloaded, ServerUnreachable
from support.servers import start_server
from support.tls_proxy import TlsProxy

SHORT = dict(max_tokens=6, seed=3)
# Text until the tiny context is nearly full (about a second), then a 200-step image: far longer than
# this module's request_timeout_s, which ends it with UNAVAILABLE after its first events.
LONG = dict(max_tokens=900, temperature=0.0, repetition_penalty=1.0)
OVERTIME = dict(LONG, force_image=True, force_image_mode="end", num_inference_steps=200)
TIMEOUT_S = 3


@pytest.fixture(scope="module")
def server(tiny_weights, tmp_path_factory):
    """One request at a time, each at most TIMEOUT_S seconds."""
    server = start_server(
        tiny_weights,
        tmp_path_factory.mktemp("triton-connection"),
        parameters={
            "minigpt5": {"max_inflight_requests": "1", "request_timeout_s": str(TIMEOUT_S)},
            "vicuna_decoder": {"prefix_cache_tokens": "0"},
        },
    )  # the long answers stay long
    yield server
    server.process.stop()


@pytest.fixture(scope="module")
def grpc_tls(server, tmp_path_factory):
    proxy = TlsProxy(server.process.grpc_port, tmp_path_factory.mktemp("tls-grpc"))
    yield proxy
    proxy.close()


@pytest.fixture(scope="module")
def https(server, tmp_path_factory):
    proxy = TlsProxy(server.process.http_port, tmp_path_factory.mktemp("tls-http"))
    yield proxy
    proxy.close()


def _refused(server) -> float:
    text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("minigpt5_requests_total{") and 'outcome="overloaded"' in line
    )


def test_grpcs_with_the_ca_and_one_channel_for_many_requests(server, grpc_tls):
    plain = Client(server.grpc_url).generate("Hello.", **SHORT)
    with Client(f"grpcs://127.0.0.1:{grpc_tls.port}", ca_cert=grpc_tls.ca_file) as client:
        answers = [client.generate("Hello.", **SHORT) for _ in range(3)]
        with concurrent.futures.ThreadPoolExecutor(1) as pool:  # from another thread: the same channel
            answers.append(pool.submit(client.generate, "Hello.", **SHORT).result())
    assert all(answer.text == plain.text and answer.finish_reason for answer in answers)
    assert grpc_tls.connections == 1


def test_tls_refuses_a_server_it_cannot_verify(server, grpc_tls, https):
    with pytest.raises(ServerUnreachable):  # the test CA is not among the system's
        Client(f"grpcs://127.0.0.1:{grpc_tls.port}", timeout=20).generate("Hello.", **SHORT)
    with pytest.raises(ServerUnreachable, match="TLS|certificate"):
        Client(f"https://127.0.0.1:{https.port}", timeout=20).generate("Hello.", **SHORT)


def test_https_with_headers_and_a_bearer_token(server, https):
    client = Client(
        f"https://127.0.0.1:{https.port}", ca_cert=https.ca_file, headers={"X-Team": "vision"}, token="s3cret"
    )
    answer = client.generate("Hello.", **SHORT)
    assert answer.text == Client(server.grpc_url).generate("Hello.", **SHORT).text
    lines = https.head_lines()
    assert "x-team: vision" in lines and "authorization: bearer s3cret" in lines


def test_grpc_metadata_carries_the_headers_and_the_token(monkeypatch):
    """gRPC headers are HPACK-compressed on the wire: a gRPC server of the test's own reads them."""
    seen = []

    def stream(requests, context):
        seen.append(dict(context.invocation_metadata()))
        context.abort(grpc.StatusCode.UNAVAILABLE, "server busy: a test server")
        yield  # a generator: a streaming method

    handler = grpc.method_handlers_generic_handler(
        "inference.GRPCInferenceService", {"ModelStreamInfer": grpc.stream_stream_rpc_method_handler(stream)}
    )
    recorder = grpc.server(futures.ThreadPoolExecutor(2), handlers=[handler])
    port = free_port()
    recorder.add_insecure_port(f"127.0.0.1:{port}")
    recorder.start()
    monkeypatch.setenv("MINIGPT5_TOKEN", "from-env")
    try:
        with pytest.raises(Overloaded):
            Client(f"grpc://127.0.0.1:{port}", headers={"X-Team": "vision"}, retries=2, retry_backoff_s=0.01).generate(
                "Hello."
            )
    finally:
        recorder.stop(None)
    assert len(seen) == 3  # the first attempt and two retries
    assert all(m["x-team"] == "vision" and m["authorization"] == "Bearer from-env" for m in seen)


def test_a_refused_request_is_retried_until_a_slot_is_free(server):
    long_started = threading.Event()

    def long_answer():
        for _ in Client(server.grpc_url).stream("A very long story.", **LONG):
            long_started.set()

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        running = pool.submit(long_answer)
        assert long_started.wait(60)
        refused_before = _refused(server)
        with pytest.raises(Overloaded):  # without retries: refused at once
            Client(server.grpc_url).generate("Hello.", **SHORT)
        answer = Client(server.grpc_url, retries=8, retry_backoff_s=0.1).generate("Hello.", **SHORT)
        running.result(timeout=60)
    assert answer.finish_reason and _refused(server) >= refused_before + 2


@pytest.mark.parametrize("url", ["grpc", "http"])
def test_an_answer_that_started_is_never_sent_again(server, url):
    address = server.grpc_url if url == "grpc" else f"http://{server.http_url}"
    refused_before, events = _refused(server), []
    with pytest.raises(Overloaded, match="request_timeout_s"):  # classified alike over HTTP, mid-stream
        for event in Client(address, retries=3, retry_backoff_s=0.05).stream("A very long story.", **OVERTIME):
            events.append(event)
    assert events  # it failed after its first events ...
    assert _refused(server) == refused_before + 1  # ... and was not sent again
