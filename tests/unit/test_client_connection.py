"""Client-side connection settings and conversation state, without a server: URLs and their schemes,
headers and the bearer token, the retry backoff, a conversation saved and loaded, and trimmed."""

from __future__ import annotations

import json

import numpy as np
import pytest

from minigpt5.request import LIMITS
from minigpt5_client import Conversation
from minigpt5_client.connection import Connection
from minigpt5_client.contract import MAX_HISTORY_CHARS, MAX_HISTORY_TURNS, MAX_IMAGES
from minigpt5_client.document import Document
from minigpt5_client.errors import InvalidArgument


@pytest.mark.parametrize(
    "url, protocol, expected",
    [
        (None, None, ("localhost:8001", "grpc", False)),
        ("example.org", "http", ("example.org:8000", "http", False)),
        ("grpcs://example.org", None, ("example.org:8001", "grpc", True)),
        ("https://example.org:443/", None, ("example.org:443", "http", True)),
        ("http://127.0.0.1:9000", "http", ("127.0.0.1:9000", "http", False)),
        ("grpc://[::1]:8001", None, ("[::1]:8001", "grpc", False)),
    ],
)
def test_the_scheme_sets_protocol_and_tls(url, protocol, expected):
    connection = Connection.from_url(url, protocol)
    assert (connection.address, connection.protocol, connection.tls) == expected


@pytest.mark.parametrize(
    "url, protocol, message",
    [
        ("ftp://example.org", None, "scheme must be one of"),
        ("https://example.org", "grpc", "contradicts"),
        ("localhost:http", None, "HOST:PORT"),
        ("localhost", "smtp", "protocol must be one of"),
    ],
)
def test_bad_urls_are_refused_with_a_reason(url, protocol, message):
    with pytest.raises(InvalidArgument, match=message):
        Connection.from_url(url, protocol)


def test_headers_token_and_ca_file(tmp_path, monkeypatch):
    monkeypatch.delenv("MINIGPT5_TOKEN", raising=False)
    assert Connection.from_url("h", headers={"X-A": "1"}).headers == {"x-a": "1"}
    assert Connection.from_url("h", token="t").headers == {"authorization": "Bearer t"}
    monkeypatch.setenv("MINIGPT5_TOKEN", "env")
    assert Connection.from_url("h").headers == {"authorization": "Bearer env"}
    with pytest.raises(InvalidArgument, match="one line"):
        Connection.from_url("h", headers={"X-A": "1\r\nX-B: 2"})
    with pytest.raises(InvalidArgument, match="ca_cert: no such file"):
        Connection.from_url("grpcs://h", ca_cert=tmp_path / "missing.pem")


def test_retry_delays_grow_with_jitter():
    connection = Connection.from_url("h", retries=5, retry_backoff_s=0.2)
    for attempt in range(5):
        delays = {connection.retry_delay(attempt) for _ in range(50)}
        low, high = 0.2 * 2**attempt * 0.5, 0.2 * 2**attempt
        assert all(low <= d <= high for d in delays) and len(delays) > 1
    with pytest.raises(InvalidArgument, match="retries"):
        Connection.from_url("h", retries=-1)


def test_the_clients_history_limits_are_the_servers():
    assert (MAX_IMAGES, MAX_HISTORY_TURNS, MAX_HISTORY_CHARS) == (
        LIMITS.max_images,
        LIMITS.max_history_turns,
        LIMITS.max_history_chars,
    )


# ---- Conversation: saved, loaded, trimmed ---------------------------------------------------------
def _pixels(seed: int, count: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, 224, 224, 3), dtype=np.uint8)


def _conversation(exchanges: int, images_each: int = 1, text: str = "words " * 5) -> Conversation:
    from minigpt5_client.preprocess import encode_png

    conversation = Conversation()
    for index in range(exchanges):
        generated = encode_png(_pixels(100 + index, 1)[0])
        answer = Document([f"answer {index} ", generated, " end"])
        conversation.add_turn(f"{text}{index}", _pixels(index, images_each), answer)
    return conversation


def test_a_saved_conversation_loads_back_exactly(tmp_path):
    conversation = _conversation(3)
    conversation.save(tmp_path / "chat.json")
    loaded = Conversation.load(tmp_path / "chat.json")
    assert loaded.history() == conversation.history()
    assert np.array_equal(loaded.images(), conversation.images())  # PNG is lossless
    assert [t.segments for t in loaded.turns] == [t.segments for t in conversation.turns]
    data = json.loads((tmp_path / "chat.json").read_text())
    data["turns"][0]["images"][0] = "not base64!"
    with pytest.raises(ValueError, match=r"turns\[0\]\.images"):
        Conversation.from_json(data)
    with pytest.raises(ValueError, match="not a saved MiniGPT-5 conversation"):
        Conversation.from_json({"turns": []})


def test_trimming_drops_the_oldest_exchanges_first():
    conversation = _conversation(5)  # 10 turns, 10 images (each answer brings one back)
    assert len(conversation.images()) == 10 > MAX_IMAGES
    newest = conversation.history()[-6:]
    assert conversation.trim(reserve_images=1) == 4  # 2 exchanges go: 6 images + 1 reserved <= 8
    assert conversation.history() == newest and len(conversation.images()) == 6
    assert conversation.trim(reserve_images=1) == 0  # it fits already


def test_trimming_to_turns_characters_and_the_context():
    assert _conversation(3).trim(max_turns=4) == 2
    long = _conversation(3, text="x" * 1000)
    assert long.trim(max_chars=2100) == 2 and len(long.turns) == 4
    chat = _conversation(4, images_each=0)
    estimate = chat.estimated_positions()
    assert chat.trim(context=estimate + 100, reserve_positions=100) == 0
    exchange = estimate - _conversation(3, images_each=0).estimated_positions()  # what one exchange weighs
    assert exchange < 100 < 2 * exchange
    assert chat.trim(context=estimate, reserve_positions=100) == 4  # two exchanges make room for 100
    assert chat.estimated_positions() + 100 <= estimate
    assert _conversation(1).trim(reserve_images=MAX_IMAGES + 1) == 2  # nothing left can fit: all go
