"""The client against the real tritonserver (fixture `triton_server`, tests/conftest.py).

The served answer for an image must equal the in-process answer (`reference_pipeline`) for the same
pre-processed pixels, whatever kind of input the image came from and whichever protocol carried it.
"""

from __future__ import annotations

import asyncio
import functools
import html.parser
import http.server
import json
import threading

import numpy as np
import pytest
from PIL import Image

from minigpt5_client import AsyncClient, Client, Conversation, Document, InvalidArgument
from minigpt5_client.contract import PARAMETERS
from minigpt5_client.preprocess import encode_png, preprocess_image
from support import client_cli

pytestmark = pytest.mark.server

PROMPT = "Tell a short story about this picture."
# Small and forced, so that every answer holds an image and stays quick with the tiny weights.
PARAMS = dict(seed=7, max_tokens=24, force_image=True, num_inference_steps=2)
INPUT_PARAMS = {PARAMETERS[keyword].name: value for keyword, value in PARAMS.items()}  # seed -> random_seed
IMAGE_TOLERANCE = 2  # levels: float rounding in the decoder (batching, a prefix from the prefix cache)


def picture() -> np.ndarray:
    y, x = np.mgrid[0:180, 0:260]
    return np.stack([x % 256, y * 255 // 180, (x * y) % 256], axis=-1).astype(np.uint8)


def pixels_of(document: Document) -> list[np.ndarray]:
    return [np.asarray(image.convert("RGB")) for image in document.pil_images()]


def assert_same_answer(document: Document, reference) -> None:
    assert document.text == reference.text
    served = pixels_of(document)
    assert len(served) == len(reference.images) >= 1
    for served_image, reference_image in zip(served, reference.images, strict=True):
        # equal up to float rounding: the prompt's prefix may come from the decoder's prefix cache
        assert np.abs(served_image.astype(int) - reference_image.astype(int)).max() <= IMAGE_TOLERANCE


@pytest.fixture(scope="module")
def reference(reference_pipeline):
    """The in-process answer for PROMPT and picture(), pre-processed with the default (pad)."""
    return reference_pipeline.run(PROMPT, images=preprocess_image(picture())[None], **INPUT_PARAMS)


@pytest.fixture(scope="module")
def image_url(tmp_path_factory):
    root = tmp_path_factory.mktemp("www")
    (root / "picture.png").write_bytes(encode_png(picture()))
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/picture.png"
    server.shutdown()


@pytest.mark.parametrize("kind", ["path", "bytes", "pil", "numpy", "url"])
def test_every_input_kind_gives_the_in_process_answer(kind, triton_server, reference, image_url, tmp_path):
    path = tmp_path / "picture.png"
    path.write_bytes(encode_png(picture()))
    source = {
        "path": str(path),
        "bytes": path.read_bytes(),
        "pil": Image.open(path),
        "numpy": picture(),
        "url": image_url,
    }[kind]
    assert_same_answer(Client(triton_server.grpc_url).generate(PROMPT, [source], **PARAMS), reference)


def test_http_gives_the_in_process_answer(triton_server, reference):
    assert_same_answer(Client(triton_server.http_url, "http").generate(PROMPT, picture(), **PARAMS), reference)


def test_async_clients_give_the_in_process_answer(triton_server, reference):
    async def both():
        async with (
            AsyncClient(triton_server.grpc_url) as grpc_client,
            AsyncClient(triton_server.http_url, "http") as http_client,
        ):
            return await asyncio.gather(
                grpc_client.generate(PROMPT, picture(), **PARAMS), http_client.generate(PROMPT, picture(), **PARAMS)
            )

    for document in asyncio.run(both()):
        assert_same_answer(document, reference)


class _ImageSources(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.sources = []

    def handle_starttag(self, tag, attrs):
        self.sources += [value for name, value in attrs if name in ("src", "href")]


def test_documents_in_each_format(triton_server, tmp_path):
    document = Client(triton_server.grpc_url).generate(PROMPT, picture(), **PARAMS)
    assert document.images and document.usage["images"] == len(document.images)

    markdown = document.save(tmp_path / "md", "md").read_text()
    assert "![image 1](image_1.png)" in markdown and (tmp_path / "md" / "image_1.png").exists()

    page = document.save(tmp_path / "html", "html").read_text()
    scan = _ImageSources()
    scan.feed(page)
    assert scan.sources and all(source.startswith("data:image/png;base64,") for source in scan.sources)
    assert "http://" not in page and "https://" not in page  # opens offline

    saved = json.loads(document.save(tmp_path / "json", "json").read_text())
    assert saved["text"] == document.text and saved["usage"] == document.usage


def test_conversation_feeds_generated_images_back(triton_server):
    client, conversation = Client(triton_server.grpc_url), Conversation()
    first = client.generate(PROMPT, picture(), history=conversation, **PARAMS)
    second = client.generate("What happens next?", history=conversation, **PARAMS)
    # The second turn sees two images: the input picture and the image generated in the first answer.
    assert second.usage["image_tokens"] == 2 * first.usage["image_tokens"] > 0
    assert [turn["num_images"] for turn in conversation.history()] == [1, 1, 0, 1]


def test_server_side_invalid_argument_is_raised(triton_server):
    with pytest.raises(InvalidArgument, match="max_tokens"):
        Client(triton_server.grpc_url).generate(PROMPT, max_tokens=10**6)
    with pytest.raises(InvalidArgument, match="max_tokens"):
        Client(triton_server.http_url, "http").generate(PROMPT, max_tokens=10**6)


run_cli = functools.partial(client_cli.run_cli, timeout=300)  # answers come from a real server


GENERATION_FLAGS = ["--seed", "7", "--max-tokens", "24", "--force-image", "--steps", "2"]


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_cli_generate_writes_an_html_page(protocol, triton_server, tmp_path):
    url = triton_server.grpc_url if protocol == "grpc" else triton_server.http_url
    image = tmp_path / "picture.png"
    image.write_bytes(encode_png(picture()))
    result = run_cli(
        "generate",
        "--url",
        url,
        "--protocol",
        protocol,
        "--prompt",
        PROMPT,
        "--image",
        str(image),
        "--out",
        str(tmp_path / "out"),
        "--format",
        "html",
        *GENERATION_FLAGS,
    )
    assert result.returncode == 0, result.stderr
    assert "[image 1 ready after" in result.stderr
    assert "data:image/png;base64," in (tmp_path / "out" / "document.html").read_text()


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_cli_server_invalid_argument_exits_2(protocol, triton_server):
    url = triton_server.grpc_url if protocol == "grpc" else triton_server.http_url
    result = run_cli("generate", "--url", url, "--protocol", protocol, "--prompt", PROMPT, "--max-tokens", "1000000")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "max_tokens" in lines[0]


def test_cli_chat_two_turns(triton_server, tmp_path):
    result = run_cli(
        "chat",
        "--url",
        triton_server.grpc_url,
        "--out",
        str(tmp_path),
        "--format",
        "json",
        *GENERATION_FLAGS,
        stdin=f"{PROMPT}\nWhat happens next?\n",
    )
    assert result.returncode == 0, result.stderr
    transcript = json.loads((tmp_path / "document.json").read_text())
    assert transcript["text"].count("You:") == 2 and transcript["text"].count("MiniGPT-5:") == 2
    assert len([s for s in transcript["segments"] if s["type"] == "image"]) >= 2
