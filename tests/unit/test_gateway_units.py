"""The gateway's pieces without a server: request parsing and refusals, messages -> turns, image
placement, usage and costs, the hand-off configuration and routes, error statuses, the ASGI app's
own answers (CORS, bad JSON), and that it imports no torch."""

from __future__ import annotations

import argparse
import base64
import json
import subprocess
import sys

import pytest

from minigpt5_client.document import Document
from minigpt5_client.errors import InvalidArgument, Overloaded, ServerError, ServerUnreachable, Timeout
from minigpt5_client.events import Final, ImageEvent, ImageStart, TextDelta
from minigpt5_client.gateway.answer import ImagePlacement, ModelUsage, inline_image
from minigpt5_client.gateway.chat_request import parse_chat_request
from minigpt5_client.gateway.completion import CompletionIds, delta_chunk, usage_json
from minigpt5_client.gateway.errors import GatewayError, from_client_error
from minigpt5_client.gateway.handoff import choose_target, handoff_messages, route_facts
from minigpt5_client.gateway.handoff_config import ConfigError, parse_handoff_config
from minigpt5_client.gateway.messages import parse_messages
from minigpt5_client.gateway.settings import GatewaySettings, load_api_keys

SETTINGS = GatewaySettings("127.0.0.1:1")
PNG = base64.b64decode("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAIAAACQd1PeAAAADElEQVR4nGP4z8AAAAMBAQDJ/pLvAAAAAElFTkSuQmCC")
DATA_URL = "data:image/png;base64," + base64.b64encode(PNG).decode()


def body(**fields) -> dict:
    return {"model": "minigpt5", "messages": [{"role": "user", "content": "Hello"}], **fields}


def refused(fields: dict, settings: GatewaySettings = SETTINGS) -> GatewayError:
    with pytest.raises(GatewayError) as error:
        parse_chat_request(body(**fields), settings)
    return error.value


# ---- the request ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "fields, param",
    [
        ({"n": 2}, "n"),
        ({"n": True}, "n"),
        ({"top_logprobs": 3}, "top_logprobs"),
        ({"stop": ["\n"]}, "stop"),
        ({"presence_penalty": 0.5}, "presence_penalty"),
        ({"logit_bias": {"1": 5}}, "logit_bias"),
        ({"tool_choice": "auto"}, "tool_choice"),
        ({"response_format": {"type": "json_schema"}}, "response_format"),
        ({"store": True}, "store"),
        ({"audio": {"voice": "x"}}, "audio"),
        ({"temperature": "hot"}, "temperature"),
        ({"max_tokens": 1.5}, "max_tokens"),
        ({"stream": "yes"}, "stream"),
        ({"seed": -1}, "seed"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
        ({"modalities": ["image"]}, "modalities"),
        ({"modalities": ["text", "image"], "force_image": False}, "force_image"),
        ({"max_images": 0, "force_image": True}, "max_images"),
        ({"max_images": -1}, "max_images"),
        ({"max_tokens": 8, "max_completion_tokens": 9}, "max_completion_tokens"),
        ({"handoff": "nowhere"}, "handoff"),
        ({"image_preprocess": "stretch"}, "image_preprocess"),
        ({"unknown_field": 1}, "unknown_field"),
    ],
)
def test_refusals_name_the_field(fields, param):
    error = refused(fields)
    assert error.status == 400 and error.param == param and error.message.startswith(param)


def test_neutral_values_and_our_fields_are_accepted():
    request = parse_chat_request(
        body(
            n=1,
            logprobs=False,
            response_format={"type": "text"},
            service_tier="auto",
            tools=[],
            user="u-1",
            stream=True,
            stream_options={"include_usage": True},
            max_completion_tokens=40,
            temperature=0.5,
            top_p=0.8,
            seed=3,
            modalities=["text", "image"],
            guidance_scale=5.0,
            num_inference_steps=4,
            scheduler="dpm",
            top_k=5,
            repetition_penalty=1.5,
            max_images=1,
            force_image_mode="end",
            inline_images=True,
            image_preprocess="crop",
        ),
        SETTINGS,
    )
    assert request.stream and request.include_usage and request.inline_images and request.max_images == 1
    assert request.preprocess == "crop" and request.handoff is None
    assert request.params == {
        "temperature": 0.5,
        "top_p": 0.8,
        "top_k": 5,
        "repetition_penalty": 1.5,
        "seed": 3,
        "force_image": True,
        "guidance_scale": 5.0,
        "num_inference_steps": 4,
        "scheduler": "dpm",
        "max_tokens": 40,
        "max_images": 1,
        "force_image_mode": "end",
    }


def test_unknown_models_are_404_and_handoff_names_are_checked():
    handoff = parse_handoff_config(
        {"handoff_models": {"gpt": {"base_url": "https://api.example.com/v1", "model": "gpt-4.1-mini"}}}
    )
    settings = GatewaySettings("127.0.0.1:1", handoff=handoff)
    assert parse_chat_request(body(model="minigpt5+gpt"), settings).handoff == "gpt"
    assert parse_chat_request(body(handoff="gpt"), settings).handoff == "gpt"
    for model in ("gpt-4o", "minigpt5+gemini", "minigpt5+auto"):  # no routes: no "auto"
        assert refused({"model": model}, settings).status == 404
    assert refused({"model": "minigpt5+gpt", "handoff": "other"}, settings).param == "handoff"


# ---- messages -> turns ------------------------------------------------------------------------------
def test_system_text_leads_the_first_user_turn_and_same_role_messages_merge():
    turns = parse_messages(
        [
            {"role": "system", "content": "Be brief."},
            {
                "role": "user",
                "content": [{"type": "text", "text": "Look"}, {"type": "image_url", "image_url": {"url": DATA_URL}}],
            },
            {"role": "user", "content": "and this"},
            {"role": "assistant", "content": "A cat."},
            {"role": "developer", "content": [{"type": "text", "text": "Rhyme."}]},
            {"role": "user", "content": "More"},
        ],
        (),
    )
    assert [(turn.role, turn.text, len(turn.images)) for turn in turns] == [
        ("human", "Be brief.\n\nRhyme.\n\nLook\n\nand this", 1),
        ("assistant", "A cat.", 0),
        ("human", "More", 0),
    ]
    assert turns[0].images[0].data == PNG and turns[0].images[0].field == "messages[1].content[1].image_url.url"


def test_assistant_images_come_back_in_every_form_the_gateway_writes():
    markdown = f"Once{inline_image(1, PNG)}upon a time"
    turns = parse_messages(
        [
            {"role": "user", "content": "Go"},
            {
                "role": "assistant",
                "content": markdown,
                "images": [{"type": "image_url", "image_url": {"url": DATA_URL}}],
                "tool_calls": None,
                "annotations": [],
            },  # an SDK's dump of a returned message
            {"role": "user", "content": "Next"},
        ],
        (),
    )
    assert turns[1].text == "Onceupon a time" and [ref.data for ref in turns[1].images] == [PNG, PNG]


@pytest.mark.parametrize(
    "messages, field",
    [
        ([{"role": "assistant", "content": "Hi"}], "messages"),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": DATA_URL}}]}], "messages[0].content"),
        ([{"role": "tool", "content": "42"}], "messages[0].role"),
        ([{"role": "user", "content": "x", "images": [DATA_URL]}], "messages[0].images"),
        ([{"role": "user", "content": [{"type": "input_audio"}]}], "messages[0].content[0].type"),
        (
            [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "x"},
                        {"type": "image_url", "image_url": {"url": "data:image/png,raw"}},
                    ],
                }
            ],
            "messages[0].content[1].image_url.url",
        ),
        (
            [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "x"},
                        {"type": "image_url", "image_url": {"url": "file:///etc/passwd"}},
                    ],
                }
            ],
            "messages[0].content[1].image_url.url",
        ),
        (
            [{"role": "assistant", "content": "x", "tool_calls": [{"id": "1"}]}, {"role": "user", "content": "y"}],
            "messages[0].tool_calls",
        ),
    ],
)
def test_bad_messages_name_the_field(messages, field):
    with pytest.raises(GatewayError) as error:
        parse_messages(messages, ())
    assert error.value.status == 400 and error.value.param == field


def test_image_urls_only_from_allowed_hosts():
    def message(url):
        return [{"role": "user", "content": [{"type": "text", "text": "x"}, {"type": "image_url", "image_url": url}]}]

    assert parse_messages(message("https://img.example.com/a.png"), ("*.example.com",))[0].images[0].url
    assert parse_messages(message("http://cdn.test/a.png"), ("cdn.test",))[0].images[0].url
    for hosts in ((), ("example.com",), ("*.example.org",)):
        with pytest.raises(GatewayError, match="allowed hosts"):
            parse_messages(message("https://img.example.com/a.png"), hosts)


# ---- the answer -------------------------------------------------------------------------------------
EVENTS = [
    TextDelta("Once "),
    ImageStart(5),
    TextDelta("upon "),
    TextDelta("a time"),
    ImageEvent(PNG, 5),
    TextDelta("."),
    Final({"prompt_tokens": 10, "image_tokens": 32, "completion_tokens": 20, "vokens": 8, "images": 1}, "stop"),
]


def place(inline: bool, max_images=None) -> tuple[list, ImagePlacement]:
    placement = ImagePlacement(inline, max_images)
    return [delta for event in EVENTS for delta in placement.feed(event)], placement


def test_inline_images_hold_the_text_after_them_until_they_arrive():
    deltas, placement = place(inline=True)
    assert [delta.content for delta in deltas] == ["Once ", inline_image(1, PNG), "upon a time", "."]
    usage = placement.usage("minigpt5")
    assert (usage.prompt_tokens, usage.completion_tokens, usage.finish_reason) == (42, 20, "stop")
    assert usage.completion_tokens_details == {"vokens": 8, "images": 1}


def test_image_entries_carry_their_offset_and_max_images_leaves_them_out():
    deltas, _ = place(inline=False)
    (image,) = [delta.images[0] for delta in deltas if delta.images]
    assert image["offset"] == 5 and image["image_url"]["url"].startswith("data:image/png;base64,")
    # announced when the model starts it, before the text that streams while it is decoded
    assert [(d.content, d.image_start, bool(d.images)) for d in deltas] == [
        ("Once ", None, False),
        ("", {"index": 1, "offset": 5}, False),
        ("upon ", None, False),
        ("a time", None, False),
        ("", None, True),
        (".", None, False),
    ]
    ids = CompletionIds("chatcmpl-1", 0, "minigpt5")
    chunk = json.loads(delta_chunk(ids, deltas[1]).removeprefix("data: "))
    assert chunk["choices"][0]["delta"] == {"image_start": {"index": 1, "offset": 5}}
    for inline in (False, True):
        deltas, placement = place(inline, max_images=0)
        assert "".join(delta.content for delta in deltas) == "Once upon a time." and not any(d.images for d in deltas)
        assert not any(d.image_start for d in deltas)
        assert placement.usage("minigpt5").completion_tokens_details == {"vokens": 8, "images": 0, "images_left_out": 1}


def test_usage_sums_the_models_and_prices_each():
    usage = usage_json(
        [
            ModelUsage("minigpt5", 40, 20, "stop", {"image_tokens": 32}, {"vokens": 8, "images": 1}, 0.001),
            ModelUsage("gpt", 100, 50, "stop", cost_usd=0.002),
        ]
    )
    assert (usage["prompt_tokens"], usage["completion_tokens"], usage["total_tokens"]) == (140, 70, 210)
    assert usage["completion_tokens_details"] == {"vokens": 8, "images": 1} and usage["cost_usd"] == 0.003
    assert [line["model"] for line in usage["models"]] == ["minigpt5", "gpt"]
    assert usage_json([ModelUsage("gpt", None, None, "stop")])["cost_usd"] is None  # a target that reports none


# ---- the hand-off -----------------------------------------------------------------------------------
CONFIG = {
    "handoff_models": {
        "text": {"base_url": "https://a.example/v1", "model": "m1"},
        "vision": {
            "base_url": "https://b.example/v1",
            "model": "m2",
            "usd_per_million_tokens": {"input": 1, "output": 4},
        },
    },
    "routes": [
        {"if": {"follow_up": True, "conversation_has_images": False}, "handoff": "text"},
        {"if": {"message_has_images": True}, "handoff": "vision"},
    ],
}


def test_routes_pick_the_target_by_the_conversation():
    config = parse_handoff_config(CONFIG)
    image = {"type": "image_url", "image_url": {"url": DATA_URL}}
    first = [{"role": "user", "content": "Hi"}]
    follow_up = first + [{"role": "assistant", "content": "Hello"}, {"role": "user", "content": "And?"}]
    with_image = [{"role": "user", "content": [{"type": "text", "text": "This?"}, image]}]
    picks = {
        name: choose_target("auto", parse_messages(messages, ()), config)
        for name, messages in (("first", first), ("follow_up", follow_up), ("with_image", with_image))
    }
    assert picks["first"] is None and picks["follow_up"].name == "text" and picks["with_image"].name == "vision"
    assert route_facts(parse_messages(follow_up, ())) == {
        "follow_up": True,
        "message_has_images": False,
        "conversation_has_images": False,
    }
    assert choose_target("text", parse_messages(with_image, ()), config).model == "m1"
    assert config.targets["vision"].price.cost_usd(1_000_000, 500_000) == 3.0


@pytest.mark.parametrize(
    "change, named",
    [
        ({"handoff_models": {"a": {"model": "m"}}}, "handoff_models.a.base_url"),
        ({"handoff_models": {"auto": {"base_url": "https://x", "model": "m"}}}, "handoff_models.auto"),
        ({"routes": [{"if": {"sunny": True}, "handoff": None}]}, "routes[0].if.sunny"),
        ({"routes": [{"if": {}, "handoff": "missing"}]}, "routes[0].handoff"),
        ({"minigpt5_usd_per_million_tokens": {"input": -1}}, "minigpt5_usd_per_million_tokens.input"),
        ({"colour": "blue"}, "colour"),
    ],
)
def test_configuration_errors_name_the_field(change, named):
    with pytest.raises(ConfigError, match=named.replace("[", r"\[").replace("]", r"\]")):
        parse_handoff_config(change)


def test_handoff_messages_carry_images_in_user_messages():
    earlier = [
        {"role": "user", "content": "Start"},
        {"role": "assistant", "content": f"Here{inline_image(1, PNG)}it is", "images": None},
        {"role": "user", "content": "Go on"},
    ]
    answer = Document(["The end ", PNG, " really."])
    messages = handoff_messages(earlier, answer, "Improve it.")
    assert [message["role"] for message in messages] == ["user", "assistant", "user", "user", "assistant", "user"]
    assert messages[1]["content"] == "Hereit is" and messages[2]["content"][1]["image_url"]["url"] == DATA_URL
    assert messages[4]["content"] == "The end [image 1] really."
    assert (
        messages[5]["content"][0]["text"] == "Improve it." and messages[5]["content"][1]["image_url"]["url"] == DATA_URL
    )


# ---- statuses ---------------------------------------------------------------------------------------
def test_client_errors_map_to_real_statuses():
    timed_out = from_client_error(Overloaded("server busy: request took longer than request_timeout_s=1"))
    busy = from_client_error(Overloaded("server busy: 2 requests in flight (max_inflight_requests)"))
    invalid = from_client_error(InvalidArgument("random_seed: must be an integer"))
    assert (timed_out.status, busy.status, busy.headers["Retry-After"]) == (504, 503, "1")
    assert (invalid.status, invalid.param) == (400, "seed")
    assert from_client_error(Timeout("no answer")).status == 504
    assert from_client_error(ServerUnreachable("cannot reach")).status == 503
    assert from_client_error(ServerError("boom")).status == 502
    assert set(busy.body()["error"]) == {"message", "type", "param", "code"}


def test_api_keys_from_the_variable_and_a_file(tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("# team keys\nk-file\n\n")
    assert load_api_keys(keys, {"MINIGPT5_GATEWAY_API_KEYS": "k1, k2,"}) == {"k1", "k2", "k-file"}
    assert load_api_keys(None, {}) == frozenset()


def test_the_app_answers_cors_bad_json_and_unknown_routes_itself():
    from starlette.testclient import TestClient

    from minigpt5_client.gateway.app import create_app

    settings = GatewaySettings("127.0.0.1:1", cors_origins=("https://app.example",))
    with TestClient(create_app(settings)) as client:
        preflight = client.options(
            "/v1/chat/completions",
            headers={
                "Origin": "https://app.example",
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization,content-type",
            },
        )
        assert preflight.status_code == 200
        assert preflight.headers["access-control-allow-origin"] == "https://app.example"
        assert (
            client.options(
                "/v1/models", headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "GET"}
            ).status_code
            == 400
        )
        bad = client.post("/v1/chat/completions", content=b"{not json", headers={"Content-Type": "application/json"})
        assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_json"
        missing = client.get("/v2/nothing")
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"


# ---- no torch, the command --------------------------------------------------------------------------
def test_the_gateway_imports_no_torch_and_its_command_has_help():
    code = (
        "import sys; from minigpt5_client.gateway.app import create_app; "
        "from minigpt5_client.gateway.settings import GatewaySettings; create_app(GatewaySettings('h:1')); "
        "import minigpt5_client.gateway.command, openai, uvicorn; "
        "heavy = {'torch', 'transformers', 'diffusers'} & set(sys.modules); assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    helped = subprocess.run(
        [sys.executable, "-m", "minigpt5_client", "gateway", "--help"], capture_output=True, text=True, timeout=120
    )
    assert helped.returncode == 0
    for flag in (
        "--url",
        "--port",
        "--api-key-file",
        "--cors-origin",
        "--allow-image-host",
        "--max-body-mib",
        "--inline-images",
        "--handoff-config",
        "--timeout",
    ):
        assert flag in helped.stdout


def test_a_bad_configuration_file_stops_the_command(tmp_path):
    config = tmp_path / "handoff.json"
    config.write_text('{"routes": [{"if": {}, "handoff": "nobody"}]}')
    result = subprocess.run(
        [sys.executable, "-m", "minigpt5_client", "gateway", "--handoff-config", str(config)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2 and "routes[0].handoff" in result.stderr


def test_bench_gateway_registers():
    from minigpt5_bench.args import add_bench_commands

    parser = argparse.ArgumentParser()
    add_bench_commands(parser.add_subparsers(dest="which", required=True))
    args = parser.parse_args(["gateway", "--url", "h:1"])
    assert args.streams == 16 and args.url == "h:1" and callable(args.handler)
