"""Client transports against stand-ins that speak Triton's wire formats (gRPC stream, HTTP SSE).

The stand-ins answer the way Triton 2.51 does for a decoupled model: gRPC responses with outputs and
the final flag, a failure as an in-band `error_message` on the open stream (the client does not ask
for the `triton_grpc_error` mode); SSE `data:` lines with one-element outputs unwrapped, an error
before the first event with its HTTP status (400 for every model error in Triton 2.51). What the real
server does is checked in test_client_server.py.
"""

from __future__ import annotations

import asyncio
import base64
import http.server
import io
import json
import re
import threading
import time
from concurrent import futures

import grpc
import numpy as np
import pytest
from PIL import Image
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import deserialize_bytes_tensor, serialize_byte_tensor, triton_to_np_dtype

from minigpt5_client import (
    AsyncClient,
    Client,
    Conversation,
    Document,
    Final,
    ImageEvent,
    ImageStart,
    InvalidArgument,
    Overloaded,
    ServerError,
    TextDelta,
    Timeout,
)
from minigpt5_client.cli import main
from minigpt5_client.preprocess import encode_png, preprocess_image, preprocess_images
from minigpt5_client.transport_http import SseDecoder

# A large, incompressible image: its SSE line (about 1 MB) spans many reads.
GENERATED_PNG = encode_png(np.random.default_rng(0).integers(0, 256, (512, 512, 3), dtype=np.uint8))
USAGE = {"prompt_tokens": 30, "image_tokens": 0, "completion_tokens": 9, "vokens": 8, "images": 1}


def scripted_answer(prompt: str) -> list[dict]:
    """The events the stand-ins send for a prompt (outputs as in docs/API.md)."""
    if prompt == "no final event":
        return [{"event_type": "text", "text_output": "cut"}]
    return [
        {"event_type": "text", "text_output": "Once"},
        {"event_type": "text", "text_output": " upon"},
        {"event_type": "image_start", "text_output": "", "image_offset": [9]},
        {"event_type": "text", "text_output": " a time."},
        {
            "event_type": "image",
            "text_output": "",
            "image_output": [base64.b64encode(GENERATED_PNG).decode()],
            "image_offset": [9],
        },
        {"event_type": "final", "text_output": "", "finish_reason": "stop", "usage": json.dumps(USAGE)},
    ]


FAILURES = {  # prompt -> (HTTP status, message): the server's wording, known to the client by its text
    "invalid": (400, "max_tokens: must be in [1, 1024], got 5000"),
    "invalid-kv": (
        400,
        "request needs 70000 KV positions, more than the KV-cache budget of 65536 (kv_cache_budget_tokens)",
    ),
    "invalid-triton": (400, "inference input 'max_tokens' data-type is 'FP32', but model 'minigpt5' expects 'INT32'"),
    "invalid-json": (400, "The schema can not convert input 'max_tokens' to tensor with proper shape"),
    "busy": (503, "Exceeds maximum queue size"),
    "busy-400": (400, "server busy: 2 requests in flight (max_inflight_requests); retry later"),
    "late-400": (400, "request took longer than request_timeout_s=2.0"),
    "broken": (400, "decoder step failed: RuntimeError('boom')"),
}
SLOW_PROMPT = "slow"


class FakeTritonGrpc(service_pb2_grpc.GRPCInferenceServiceServicer):
    def __init__(self):
        self.requests: list[dict] = []
        self.cancelled = threading.Event()

    def ModelStreamInfer(self, request_iterator, context):
        answered = []
        context.add_callback(lambda: None if answered else self.cancelled.set())  # runs when the call ends
        assert "triton_grpc_error" not in dict(context.invocation_metadata())
        for request in request_iterator:
            tensors = {
                tensor.name: _decode(tensor, raw)
                for tensor, raw in zip(request.inputs, request.raw_input_contents, strict=True)
            }
            self.requests.append(tensors)
            prompt = tensors["text_input"][0].decode()
            if prompt in FAILURES:  # in-band: the request ends, the stream stays open
                yield service_pb2.ModelStreamInferResponse(error_message=FAILURES[prompt][1])
                answered.append(True)
                continue
            if prompt == SLOW_PROMPT:
                time.sleep(3)
            events = scripted_answer(prompt)
            for index, outputs in enumerate(events):
                yield service_pb2.ModelStreamInferResponse(
                    infer_response=_encode(outputs | {"sequence_index": [index]}, final=index == len(events) - 1)
                )
                if prompt == "stream slowly":
                    time.sleep(0.5)
            answered.append(True)


def _decode(tensor, raw: bytes) -> np.ndarray:
    if tensor.datatype == "BYTES":
        return deserialize_bytes_tensor(raw)
    return np.frombuffer(raw, dtype=triton_to_np_dtype(tensor.datatype)).reshape(list(tensor.shape))


def _encode(outputs: dict, final: bool) -> service_pb2.ModelInferResponse:
    response = service_pb2.ModelInferResponse(model_name="minigpt5")
    for name, value in outputs.items():
        values = value if isinstance(value, list) else [value]
        if isinstance(values[0], str):
            datatype, raw = "BYTES", serialize_byte_tensor(np.array([v.encode() for v in values], dtype=object)).item()
        else:
            datatype, raw = "INT32", np.array(values, np.int32).tobytes()
        response.outputs.add(name=name, datatype=datatype, shape=[len(values)])
        response.raw_output_contents.append(raw)
    response.parameters["triton_final_response"].bool_param = final
    return response


class FakeTritonHttp(http.server.BaseHTTPRequestHandler):
    requests: list[dict] = []

    def do_POST(self):
        assert self.path == "/v2/models/minigpt5/generate_stream"
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.requests.append(body)
        prompt = body["text_input"]
        if prompt in FAILURES:
            status, message = FAILURES[prompt]
            payload = f"data: {json.dumps({'error': message})}\n\n" if status == 400 else json.dumps({"error": message})
            return self._reply(status, [payload.encode()])
        if prompt == SLOW_PROMPT:
            time.sleep(3)
        if prompt == "fails midway":
            return self._reply(
                200,
                [b'data: {"event_type": "text", "text_output": "Once"}\n\n', b'data: {"error": "decoder crashed"}\n\n'],
            )
        chunks = []
        for index, outputs in enumerate(scripted_answer(prompt)):
            # Triton unwraps one-element outputs: "image_offset": [9] is sent as 9.
            unwrapped = {k: (v[0] if isinstance(v, list) and len(v) == 1 else v) for k, v in outputs.items()}
            chunks.append(f"data: {json.dumps(unwrapped | {'sequence_index': index})}\r\n\r\n".encode())
        self._reply(200, chunks)

    def _reply(self, status: int, chunks: list[bytes]):
        try:
            self.send_response(status)
            self.send_header("Content-Type", "text/event-stream; charset=utf-8")
            self.send_header("Connection", "close")
            self.end_headers()
            for chunk in chunks:
                self.wfile.write(chunk)
                self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout tests)
            pass

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def grpc_server():
    servicer = FakeTritonGrpc()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer, f"127.0.0.1:{port}"
    server.stop(grace=None)


@pytest.fixture(scope="module")
def http_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeTritonHttp)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield FakeTritonHttp, f"127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture(params=["grpc", "http"])
def server(request, grpc_server, http_server):
    """(protocol, url, list of the requests the stand-in received)."""
    fake, url = grpc_server if request.param == "grpc" else http_server
    fake.requests.clear()
    return request.param, url, fake.requests


def picture(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (120, 90, 3), dtype=np.uint8)


def sent_images(protocol: str, request: dict) -> np.ndarray:
    """The pixels the server receives: the `images` tensor (gRPC) or the decoded `image_bytes` (HTTP)."""
    if protocol == "grpc":
        return request.get("images", np.zeros((0, 224, 224, 3), np.uint8))
    encoded = [base64.b64decode(item) for item in request.get("image_bytes", [])]
    return preprocess_images(encoded) if encoded else np.zeros((0, 224, 224, 3), np.uint8)


def expected_story(document: Document):
    assert document.segments == ["Once upon", GENERATED_PNG, " a time."]
    assert document.usage == USAGE and document.finish_reason == "stop"


def test_stream_events_in_order(server):
    protocol, url, _ = server
    events = list(Client(url, protocol).stream("story"))
    assert [type(event) for event in events] == [TextDelta, TextDelta, ImageStart, TextDelta, ImageEvent, Final]
    assert events[2] == ImageStart(9) and events[4].offset == 9
    assert events[4].to_pil().size == (512, 512)
    expected_story(Document.from_events(events))


def test_request_carries_images_and_parameters(server):
    protocol, url, requests = server
    sources = [picture(1), encode_png(picture(2))]
    Client(url, protocol, preprocess="crop").generate(
        "story",
        sources,
        seed=2**63 + 5,
        max_tokens=40,
        temperature=0.7,
        force_image=True,
        scheduler="dpm",
        force_image_mode="end",
        max_images=2,
    )
    request = requests[-1]
    assert np.array_equal(sent_images(protocol, request), preprocess_images(sources, "crop"))
    if protocol == "grpc":
        assert request["text_input"].tolist() == [b"story"] and request["stream"].tolist() == [True]
        assert request["random_seed"].dtype == np.uint64 and request["random_seed"][0] == 2**63 + 5
        assert request["max_tokens"].dtype == np.int32 and request["temperature"].dtype == np.float32
        assert request["force_image"].tolist() == [True] and request["scheduler"].tolist() == [b"dpm"]
        assert request["force_image_mode"].tolist() == [b"end"]
        assert request["max_images"].dtype == np.int32 and request["max_images"].tolist() == [2]
        assert "history" not in request and "top_p" not in request  # unset parameters: server defaults
    else:
        assert request["text_input"] == "story" and request["stream"] is True
        assert request["random_seed"] == 2**63 + 5 and request["max_tokens"] == 40
        assert request["temperature"] == pytest.approx(0.7) and request["force_image"] is True
        assert request["scheduler"] == "dpm" and "history" not in request and "top_p" not in request
        assert request["force_image_mode"] == "end" and request["max_images"] == 2


def test_conversation_sends_earlier_turns_and_generated_images(server):
    protocol, url, requests = server
    client, conversation = Client(url, protocol), Conversation()
    expected_story(client.generate("story", picture(3), history=conversation))
    client.generate("story", [picture(4)], history=conversation)

    request = requests[-1]
    history = json.loads(request["history"][0] if protocol == "grpc" else request["history"])
    assert history == [
        {"role": "human", "text": "story", "num_images": 1},
        {"role": "assistant", "text": "Once upon a time.", "num_images": 1},
    ]
    expected = np.stack([preprocess_image(picture(3)), preprocess_image(GENERATED_PNG), preprocess_image(picture(4))])
    assert np.array_equal(sent_images(protocol, request), expected)
    assert len(conversation.turns) == 4


@pytest.mark.parametrize(
    "prompt,error",
    [
        ("invalid", InvalidArgument),
        ("invalid-kv", InvalidArgument),
        ("invalid-triton", InvalidArgument),
        ("invalid-json", InvalidArgument),
        ("busy", Overloaded),
        ("busy-400", Overloaded),
        ("late-400", Overloaded),
        ("broken", ServerError),
    ],
)
def test_server_errors_map_to_exceptions(server, prompt, error):
    protocol, url, _ = server
    with pytest.raises(error, match=re.escape(FAILURES[prompt][1][:20])) as raised:
        list(Client(url, protocol).stream(prompt))
    assert "\n" not in str(raised.value)


def test_timeout(server):
    protocol, url, _ = server
    started = time.monotonic()
    with pytest.raises(Timeout):
        Client(url, protocol, timeout=1.0).generate(SLOW_PROMPT)
    assert time.monotonic() - started < 2.5


def test_answer_without_final_event_is_an_error(server):
    protocol, url, _ = server
    with pytest.raises(ServerError, match="final event"):
        Client(url, protocol).generate("no final event")


def test_error_in_the_middle_of_an_sse_stream(http_server):
    _, url = http_server
    with pytest.raises(ServerError, match="decoder crashed"):
        Client(url, "http").generate("fails midway")


def test_leaving_a_grpc_stream_early_cancels_the_request(grpc_server):
    servicer, url = grpc_server
    servicer.cancelled.clear()
    events = Client(url).stream("stream slowly")
    assert isinstance(next(events), TextDelta)
    events.close()
    assert servicer.cancelled.wait(2)  # long before the 3 s answer would have ended


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_async_client(protocol, grpc_server, http_server):
    url = (grpc_server if protocol == "grpc" else http_server)[1]

    async def session():
        async with AsyncClient(url, protocol) as client:
            events = [event async for event in client.stream("story")]
            concurrent = await asyncio.gather(*(client.generate("story", picture(seed)) for seed in range(3)))
            with pytest.raises(InvalidArgument):
                await client.generate("invalid")
        async with AsyncClient(url, protocol, timeout=1.0) as impatient_client:
            with pytest.raises(Timeout):
                await impatient_client.generate(SLOW_PROMPT)
        return events, concurrent

    events, documents = asyncio.run(session())
    assert [type(event) for event in events] == [TextDelta, TextDelta, ImageStart, TextDelta, ImageEvent, Final]
    for document in documents:
        expected_story(document)


def test_sse_decoder_joins_lines_split_anywhere():
    stream = b'data: {"a": 1}\r\n\r\n: comment\nevent: x\ndata: {"b":\ndata: 2}\n\n'
    for split in range(1, len(stream)):
        decoder = SseDecoder()
        payloads = decoder.feed(stream[:split]) + decoder.feed(stream[split:])
        assert payloads == ['{"a": 1}', '{"b":\n2}']


def test_unknown_parameter_and_bad_values_fail_before_sending(grpc_server):
    client = Client(grpc_server[1])
    with pytest.raises(TypeError, match="unknown generation parameter 'temprature'"):
        client.stream("story", temprature=0.5)
    with pytest.raises(TypeError, match="max_tokens must be int32"):
        client.stream("story", max_tokens="10")
    with pytest.raises(InvalidArgument, match="seed must be between 0"):
        client.stream("story", seed=-1)
    with pytest.raises(InvalidArgument, match="HOST:PORT"):
        Client("localhost:http")
    with pytest.raises(InvalidArgument, match="scheme must be one of"):
        Client("ftp://example.com")
    assert Client("http://127.0.0.1/", "http").url == "127.0.0.1:8000"


def test_decoded_generated_image_is_the_png_sent(grpc_server):
    document = Client(grpc_server[1]).generate("story")
    assert Image.open(io.BytesIO(document.images[0])).tobytes() == Image.open(io.BytesIO(GENERATED_PNG)).tobytes()


# The CLI over the stand-ins ------------------------------------------------------------------------------


@pytest.mark.parametrize("document_format", ["md", "html", "json"])
def test_cli_generate_streams_text_and_writes_the_document(server, tmp_path, capsys, document_format):
    protocol, url, requests = server
    image = tmp_path / "input.png"
    image.write_bytes(encode_png(picture(5)))
    out = tmp_path / "out"
    code = main(
        [
            "generate",
            "--url",
            url,
            "--protocol",
            protocol,
            "--prompt",
            "story",
            "--image",
            str(image),
            "--out",
            str(out),
            "--format",
            document_format,
            "--seed",
            "3",
            "--force-image",
        ]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert captured.out == "Once upon a time.\n"
    assert "[generating image 1 …]" in captured.err and "[image 1 ready after" in captured.err
    assert f"saved {out / f'document.{document_format}'}" in captured.err
    assert (out / f"document.{document_format}").exists()
    assert np.array_equal(sent_images(protocol, requests[-1]), preprocess_image(picture(5))[None])


@pytest.mark.parametrize("prompt,code", [("invalid", 2), ("busy", 4), (SLOW_PROMPT, 5)])
def test_cli_server_errors_exit_codes(server, capsys, prompt, code):
    protocol, url, _ = server
    assert (
        main(
            ["generate", "--url", url, "--protocol", protocol, "--prompt", prompt, "--timeout", "1", "--out", "unused"]
        )
        == code
    )
    error_lines = capsys.readouterr().err.strip().splitlines()
    assert len(error_lines) == 1 and error_lines[0].startswith("error: ")


def test_cli_chat_keeps_the_conversation(server, tmp_path, capsys, monkeypatch):
    protocol, url, requests = server
    image = tmp_path / "input.png"
    image.write_bytes(encode_png(picture(6)))
    monkeypatch.setattr("sys.stdin", io.StringIO(f"story\n/image {image}\nstory\n/save {tmp_path / 'chat'}\n"))
    assert main(["chat", "--url", url, "--protocol", protocol, "--format", "json"]) == 0
    captured = capsys.readouterr()
    assert captured.out == "Once upon a time.\n" * 2
    assert len(requests) == 2
    history = requests[-1]["history"]
    assert len(json.loads(history[0] if protocol == "grpc" else history)) == 2
    assert sent_images(protocol, requests[-1]).shape == (2, 224, 224, 3)  # generated image, then the new one
    transcript = json.loads((tmp_path / "chat" / "document.json").read_text())
    assert transcript["text"].count("Once upon a time.") == 2
