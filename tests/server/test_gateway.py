"""The OpenAI-compatible gateway against the real tritonserver, driven by the official `openai` SDK
(sync and async): text, images out and in, conversations, every error status, disconnects, the
hand-off to a second model (a second gateway process), and `minigpt5-bench gateway`'s JSON.

One server of this module's own with max_inflight_requests=2, so that overload is real; and the
disconnect tests cancel gRPC streams, which the session server must never see (tests/server/test_disconnects.py).
"""

from __future__ import annotations

import asyncio
import base64
import functools
import http.server
import io
import json
import threading
import time

import httpx
import openai
import pytest
from PIL import Image

from minigpt5_bench.gateway import GatewayProcess
from minigpt5_client import Client, Conversation
from minigpt5_client.gateway.handoff_config import DEFAULT_INSTRUCTION, parse_handoff_config
from minigpt5_client.gateway.settings import GatewaySettings
from support.gateway import InProcessGateway, metric, picture
from support.servers import start_server

pytestmark = pytest.mark.server

KEY = "test-key"
SECOND_KEY = "second-gateway-key"
LIMIT = 2  # max_inflight_requests of this module's server
PROMPT = "Tell a short story."
SMALL = dict(max_tokens=16, seed=7)  # quick with the tiny weights
IMAGE = dict(max_tokens=24, seed=7, extra_body={"num_inference_steps": 2})  # with modalities text+image
# Greedy without repetition penalty, the tiny random weights loop and never stop by themselves
# (tests/server/test_disconnects.py): 900 tokens, seconds of decoding. Cancelled while it decodes, a request
# ends at once; the server does not watch for cancels while it awaits an image.
LONG_PROMPT = "A very long story."
LONG = dict(max_tokens=900, temperature=0.0, extra_body={"repetition_penalty": 1.0})  # SDK keywords
LONG_BODY = {"max_tokens": 900, "temperature": 0.0, "repetition_penalty": 1.0}  # the same, as JSON


# ---- servers ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def triton(tiny_weights, tmp_path_factory):
    server = start_server(
        tiny_weights,
        tmp_path_factory.mktemp("triton-gateway"),
        parameters={"minigpt5": {"max_inflight_requests": str(LIMIT)}},
    )
    yield server
    server.process.stop()


@pytest.fixture(scope="module")
def second_gateway(triton):
    """The hand-off target: a real OpenAI-compatible server in its own process (another gateway)."""
    process = GatewayProcess(triton.grpc_url, "--log-level", "warning", env={"MINIGPT5_GATEWAY_API_KEYS": SECOND_KEY})
    process.wait_ready()
    yield process
    process.stop()


HANDOFF_BODY = {"max_tokens": 12, "seed": 5}  # what the first gateway adds to each hand-off request


@pytest.fixture(scope="module")
def gateway(triton, second_gateway, monkeypatch_module):
    monkeypatch_module.setenv("SECOND_GATEWAY_KEY", SECOND_KEY)
    target = {
        "base_url": f"{second_gateway.url}/v1",
        "model": "minigpt5",
        "api_key_env": "SECOND_GATEWAY_KEY",
        "extra_body": HANDOFF_BODY,
    }
    handoff = parse_handoff_config(
        {
            "handoff_models": {
                "second": {**target, "usd_per_million_tokens": {"input": 1.0, "output": 2.0}},
                "text": target,
                "vision": target,
            },
            "minigpt5_usd_per_million_tokens": {"input": 0.5, "output": 0.5},
            "routes": [{"if": {"conversation_has_images": False}, "handoff": "text"}, {"if": {}, "handoff": "vision"}],
        }
    )
    settings = GatewaySettings(
        triton.grpc_url, api_keys=frozenset({KEY}), handoff=handoff, max_body_bytes=2**20, image_hosts=("127.0.0.1",)
    )
    with InProcessGateway(settings) as running:
        yield running


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


@pytest.fixture(scope="module")
def sdk(gateway):
    return openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=KEY, max_retries=0)


def async_sdk(gateway) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{gateway.url}/v1", api_key=KEY, max_retries=0)


def user(text: str, *images: bytes) -> dict:
    if not images:
        return {"role": "user", "content": text}
    return {
        "role": "user",
        "content": [
            {"type": "text", "text": text},
            *({"type": "image_url", "image_url": {"url": data_url(png)}} for png in images),
        ],
    }


def data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def png_of(url: str) -> bytes:
    assert url.startswith("data:image/png;base64,")
    return base64.b64decode(url.split(",", 1)[1])


def wait_until_cancelled(triton, cancelled_before: float, count: int, within_s: float = 20) -> None:
    """The Triton requests ended as `cancelled` (not run to their end) and nothing is in flight."""
    deadline = time.monotonic() + within_s
    while (
        metric(triton, "minigpt5_requests_total", outcome="cancelled") < cancelled_before + count
        or metric(triton, "minigpt5_inflight_requests", model="minigpt5") > 0
    ):
        assert time.monotonic() < deadline, f"the Triton requests were not cancelled\n{triton.log_tail(20)}"
        time.sleep(0.1)


# ---- answers ----------------------------------------------------------------------------------------
def test_models_are_listed(sdk):
    names = {model.id for model in sdk.models.list()}
    assert names == {"minigpt5", "minigpt5+second", "minigpt5+text", "minigpt5+vision", "minigpt5+auto"}
    assert sdk.models.retrieve("minigpt5+second").id == "minigpt5+second"


def test_streamed_text_is_the_direct_answer(sdk, triton):
    stream = sdk.chat.completions.create(
        model="minigpt5", messages=[user(PROMPT)], stream=True, stream_options={"include_usage": True}, **SMALL
    )
    chunks = list(stream)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    direct = Client(triton.grpc_url).generate(PROMPT, **SMALL)
    assert text == direct.text and len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1
    assert chunks[-2].choices[0].finish_reason == direct.finish_reason
    usage = chunks[-1].usage
    assert not chunks[-1].choices and usage.completion_tokens == direct.usage["completion_tokens"]
    assert usage.prompt_tokens == direct.usage["prompt_tokens"] and usage.total_tokens == 16 + usage.prompt_tokens
    assert usage.model_extra["cost_usd"] == pytest.approx((usage.prompt_tokens + 16) * 0.5e-6)


def test_an_image_comes_back_for_text_and_image_modalities(gateway, triton):
    async def ask():
        async with async_sdk(gateway) as client:
            return await client.chat.completions.create(
                model="minigpt5", messages=[user(PROMPT)], modalities=["text", "image"], **IMAGE
            )

    completion = asyncio.run(ask())
    message = completion.choices[0].message
    (image,) = message.model_extra["images"]
    assert image["type"] == "image_url"
    decoded = Image.open(io.BytesIO(png_of(image["image_url"]["url"])))
    assert decoded.format == "PNG" and decoded.size[0] == decoded.size[1] > 0
    direct = Client(triton.grpc_url).generate(PROMPT, force_image=True, max_tokens=24, seed=7, num_inference_steps=2)
    assert png_of(image["image_url"]["url"]) == direct.images[0] and message.content == direct.text
    text_before = "".join(segment for segment in direct.segments[: direct.segments.index(direct.images[0])])
    assert image["offset"] == len(text_before)  # where the model put it
    details = completion.usage.completion_tokens_details.model_dump()
    assert details["vokens"] == 8 and details["images"] == 1


def test_inline_images_sit_in_the_text_where_the_model_put_them(sdk):
    plain = (
        sdk.chat.completions.create(model="minigpt5", messages=[user(PROMPT)], modalities=["text", "image"], **IMAGE)
        .choices[0]
        .message
    )
    stream = sdk.chat.completions.create(
        model="minigpt5",
        messages=[user(PROMPT)],
        modalities=["text", "image"],
        stream=True,
        **{**IMAGE, "extra_body": {**IMAGE["extra_body"], "inline_images": True}},
    )
    content = "".join(chunk.choices[0].delta.content or "" for chunk in stream)
    (image,) = plain.model_extra["images"]
    markdown = f"\n\n![image 1]({image['image_url']['url']})\n\n"
    assert content == plain.content[: image["offset"]] + markdown + plain.content[image["offset"] :]


def test_an_image_sent_in_and_a_conversation_with_the_generated_image(sdk, triton):
    """The gateway feeds history as `minigpt5 chat` does: the same answers as the thin client's Conversation."""
    system = "You write stories."
    messages = [{"role": "system", "content": system}, user("What is in this picture?", picture())]
    first = sdk.chat.completions.create(model="minigpt5", messages=messages, modalities=["text", "image"], **IMAGE)
    messages += [first.choices[0].message.model_dump(exclude_none=True), user("What happens next?")]
    second = sdk.chat.completions.create(model="minigpt5", messages=messages, modalities=["text", "image"], **IMAGE)

    client, conversation = Client(triton.grpc_url), Conversation()
    params = dict(force_image=True, max_tokens=24, seed=7, num_inference_steps=2)
    direct_first = client.generate(f"{system}\n\nWhat is in this picture?", [picture()], history=conversation, **params)
    direct_second = client.generate("What happens next?", history=conversation, **params)
    assert first.choices[0].message.content == direct_first.text
    assert second.choices[0].message.content == direct_second.text
    # the second turn saw two images: the picture and the image generated in the first answer
    image_tokens = second.usage.prompt_tokens_details.model_dump()["image_tokens"]  # a field in newer SDKs
    assert image_tokens == 2 * first.usage.prompt_tokens_details.model_dump()["image_tokens"] > 0


@pytest.fixture(scope="module")
def image_server(tmp_path_factory):
    """http://127.0.0.1:PORT/ serving picture.png (and a folder, which answers with a redirect)."""
    root = tmp_path_factory.mktemp("www")
    (root / "picture.png").write_bytes(picture())
    (root / "folder").mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_image_urls_of_an_allowed_host_are_fetched_without_redirects(sdk, image_server):
    def ask(url):
        message = {
            "role": "user",
            "content": [{"type": "text", "text": PROMPT}, {"type": "image_url", "image_url": {"url": url}}],
        }
        return sdk.chat.completions.create(model="minigpt5", messages=[message], **SMALL)

    fetched, sent = ask(f"{image_server}/picture.png"), ask(data_url(picture()))
    assert fetched.choices[0].message.content == sent.choices[0].message.content
    assert fetched.usage.prompt_tokens == sent.usage.prompt_tokens
    with pytest.raises(openai.BadRequestError, match="HTTP 301 .redirects are not followed"):
        ask(f"{image_server}/folder")


# ---- errors -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "fields, param",
    [
        ({"n": 2}, "n"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ({"logprobs": True}, "logprobs"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"temperature": 7.0}, "temperature"),  # refused by the server
        ({"extra_body": {"frobnicate": 1}}, "frobnicate"),
        ({"modalities": ["audio"]}, "modalities"),
    ],
)
def test_what_cannot_be_honoured_is_a_400_naming_the_field(sdk, fields, param):
    with pytest.raises(openai.BadRequestError) as refused:
        sdk.chat.completions.create(model="minigpt5", messages=[user(PROMPT)], **fields)
    assert refused.value.status_code == 400 and refused.value.param == param
    assert refused.value.message.startswith(param) or param in refused.value.message


def test_bad_images_and_unknown_models(sdk):
    with pytest.raises(openai.BadRequestError, match=r"messages\[0\]\.content\[1\]\.image_url\.url") as refused:
        sdk.chat.completions.create(model="minigpt5", messages=[user(PROMPT, b"not an image")], **SMALL)
    assert "not a readable image" in refused.value.message
    remote = {
        "role": "user",
        "content": [
            {"type": "text", "text": PROMPT},
            {"type": "image_url", "image_url": {"url": "http://localhost:1/a.png"}},
        ],
    }
    with pytest.raises(openai.BadRequestError, match="allowed hosts"):
        sdk.chat.completions.create(model="minigpt5", messages=[remote], **SMALL)
    with pytest.raises(openai.NotFoundError) as unknown:
        sdk.chat.completions.create(model="gpt-4o", messages=[user(PROMPT)])
    assert unknown.value.code == "model_not_found"


def test_api_keys_and_body_limit(gateway):
    for key in (None, "wrong"):
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        reply = httpx.get(f"{gateway.url}/v1/models", headers=headers)
        assert reply.status_code == 401 and reply.json()["error"]["code"] in ("missing_api_key", "invalid_api_key")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="wrong", max_retries=0).models.list()
    big = {"model": "minigpt5", "messages": [user("x" * 2**20)]}
    reply = httpx.post(f"{gateway.url}/v1/chat/completions", json=big, headers={"Authorization": f"Bearer {KEY}"})
    assert reply.status_code == 413 and "limit" in reply.json()["error"]["message"]
    assert httpx.get(f"{gateway.url}/health").json() == {"status": "ok"}  # health needs no key


def test_a_busy_server_is_a_503_and_a_client_that_leaves_cancels_its_request(gateway, triton):
    """LIMIT long streams are held open; one more is refused with 503 + Retry-After. Then the streams'
    clients go away and a non-streaming client times out: each Triton request ends as cancelled."""
    cancelled_before = metric(triton, "minigpt5_requests_total", outcome="cancelled")
    headers = {"Authorization": f"Bearer {KEY}"}
    body = {"model": "minigpt5", "messages": [user(LONG_PROMPT)], "stream": True, **LONG_BODY}
    third = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=KEY, max_retries=0)
    third.models.list()  # the SDK's first call imports a lot: not while the slots are held
    with httpx.Client(base_url=gateway.url, headers=headers, timeout=60) as http:
        streams = [http.stream("POST", "/v1/chat/completions", json=body) for _ in range(LIMIT)]
        replies = [stream.__enter__() for stream in streams]
        assert [reply.status_code for reply in replies] == [200] * LIMIT
        lines = [reply.iter_lines() for reply in replies]  # kept: a line iterator dropped closes its response
        for reply_lines in lines:
            next(reply_lines)  # admitted: its first chunk came
        with pytest.raises(openai.InternalServerError) as busy:
            third.chat.completions.create(model="minigpt5", messages=[user(PROMPT)], **SMALL)
        assert busy.value.status_code == 503 and busy.value.response.headers["retry-after"] == "1"
        assert "max_inflight_requests" in busy.value.message
        assert metric(triton, "minigpt5_inflight_requests", model="minigpt5") == LIMIT  # still running
        for stream in streams:
            stream.__exit__(None, None, None)  # the client goes away mid-answer
    wait_until_cancelled(triton, cancelled_before, LIMIT)
    with pytest.raises(httpx.ReadTimeout):  # not streamed: the gateway watches the connection meanwhile
        httpx.post(
            f"{gateway.url}/v1/chat/completions",
            headers=headers,
            timeout=0.5,
            json={"model": "minigpt5", "messages": [user(LONG_PROMPT)], **LONG_BODY},
        )
    wait_until_cancelled(triton, cancelled_before, LIMIT + 1)


def test_timeouts_are_504(triton):
    cancelled_before = metric(triton, "minigpt5_requests_total", outcome="cancelled")
    settings = GatewaySettings(triton.grpc_url, timeout_s=0.5)
    with (
        InProcessGateway(settings) as short,
        openai.OpenAI(base_url=f"{short.url}/v1", api_key="unused", max_retries=0) as client,
    ):
        with pytest.raises(openai.APIStatusError) as timed_out:
            client.chat.completions.create(model="minigpt5", messages=[user(LONG_PROMPT)], **LONG)
        assert timed_out.value.status_code == 504 and "timed out" in timed_out.value.message
        # streaming: the 200 went out with the first text, so the timeout comes as an error event
        chunks = []
        with pytest.raises(openai.APIError, match="timed out") as failed:
            for chunk in client.chat.completions.create(
                model="minigpt5", messages=[user(LONG_PROMPT)], stream=True, **LONG
            ):
                chunks.append(chunk)
        assert chunks and not isinstance(failed.value, openai.APIStatusError)
    wait_until_cancelled(triton, cancelled_before, 2)  # the timed-out requests were stopped


# ---- the hand-off -----------------------------------------------------------------------------------
def test_handoff_streams_both_answers_with_both_usages(sdk):
    stream = sdk.chat.completions.create(
        model="minigpt5+second",
        messages=[user(PROMPT)],
        stream=True,
        stream_options={"include_usage": True},
        modalities=["text", "image"],
        **IMAGE,
    )
    chunks = list(stream)
    deltas = [chunk.choices[0].delta for chunk in chunks if chunk.choices]
    content = "".join(delta.content or "" for delta in deltas)
    (mark,) = [delta.model_extra["handoff"] for delta in deltas if (delta.model_extra or {}).get("handoff")]
    assert mark["model"] == "second" and content[mark["content_offset"] - len("\n\n**second:** ") :].startswith(
        "\n\n**second:** "
    )
    ours, theirs = content[: mark["content_offset"] - len("\n\n**second:** ")], content[mark["content_offset"] :]
    assert ours and theirs
    assert {chunk.model for chunk in chunks if chunk.choices and chunk.choices[0].delta.content} == {
        "minigpt5+second",
        "second",
    }  # as asked for, then the hand-off model
    usage = chunks[-1].usage
    minigpt5_line, second_line = usage.model_extra["models"]
    assert (minigpt5_line["model"], second_line["model"]) == ("minigpt5", "second")
    assert second_line["completion_tokens"] == HANDOFF_BODY["max_tokens"] or second_line["finish_reason"] == "stop"
    # the second model saw MiniGPT-5's image: 32 image tokens per image with the tiny weights
    assert (
        second_line["prompt_tokens_details"]["image_tokens"]
        == minigpt5_line["prompt_tokens_details"]["image_tokens"] + 32
    )
    assert usage.completion_tokens == minigpt5_line["completion_tokens"] + second_line["completion_tokens"]
    assert second_line["cost_usd"] == pytest.approx(
        (second_line["prompt_tokens"] * 1.0 + second_line["completion_tokens"] * 2.0) / 1e6
    )
    assert usage.model_extra["cost_usd"] == pytest.approx(minigpt5_line["cost_usd"] + second_line["cost_usd"])


def test_handoff_routes_and_answers_unstreamed(gateway, second_gateway):
    async def ask(messages):
        async with async_sdk(gateway) as client:
            return await client.chat.completions.create(
                model="minigpt5+auto", messages=messages, extra_body={"max_images": 0}, **SMALL
            )

    text_only, with_image = asyncio.run(ask([user(PROMPT)])), asyncio.run(ask([user(PROMPT, picture())]))
    assert text_only.choices[0].message.model_extra["handoff"]["model"] == "text"
    assert with_image.choices[0].message.model_extra["handoff"]["model"] == "vision"
    message = text_only.choices[0].message
    assert "images" not in message.model_extra  # max_images 0: the hand-off got MiniGPT-5's text alone
    theirs = message.content[message.model_extra["handoff"]["content_offset"] :]
    # the second model's text is what that model answers when asked directly with the same conversation
    ours = message.content[: message.content.index("\n\n**text:** ")]
    asked = openai.OpenAI(base_url=f"{second_gateway.url}/v1", api_key=SECOND_KEY, max_retries=0)
    direct = asked.chat.completions.create(
        model="minigpt5",
        messages=[user(PROMPT), {"role": "assistant", "content": ours}, user(DEFAULT_INSTRUCTION)],
        **HANDOFF_BODY,
    )
    assert theirs == direct.choices[0].message.content
    assert [line["model"] for line in text_only.usage.model_extra["models"]] == ["minigpt5", "text"]


# ---- the bench --------------------------------------------------------------------------------------
def test_bench_gateway_json(triton, capsys):
    from minigpt5_bench.__main__ import main

    capsys.readouterr()
    code = main(
        [
            "gateway",
            "--url",
            triton.grpc_url,
            "--requests",
            "1",
            "--rounds",
            "1",
            "--streams",
            str(LIMIT),
            "--max-tokens",
            "16",
            "--stream-tokens",
            "16",
            "--json",
        ]
    )
    data = json.loads(capsys.readouterr().out)
    assert code == 0 and data["errors"] == 0 and data["bench"] == "gateway"
    lone, streams = data["lone"], data["streams"]
    assert lone["same_text"] and lone["direct_ms"]["n"] == lone["gateway_ms"]["n"] == 1
    assert streams["same_tokens"] and streams["streams"] == LIMIT and streams["tokens_per_round"][0] > 0
    summary = data["summary"]
    assert (
        summary["lone_latency_ratio"]
        == lone["latency_ratio"]
        == pytest.approx(  # one pair: its ratio
            lone["gateway_ms"]["ms"] / lone["direct_ms"]["ms"], rel=0.01
        )
        == lone["ratio_of_medians"]
    )
    assert summary["streams_tokens_per_s_ratio"] > 0 and set(summary["targets_met"]) == {
        "lone_latency_ratio",
        "streams_tokens_per_s_ratio",
    }
    assert data["gateway"]["exit_code"] is not None
