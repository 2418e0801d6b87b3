"""Assembling streamed events into a document; saving it as Markdown, HTML and JSON; conversations."""

from __future__ import annotations

import base64
import html.parser
import io
import json

import numpy as np
import pytest
from PIL import Image

from minigpt5_client import Conversation, Document, Final, ImageEvent, ImageStart, InvalidArgument, TextDelta
from minigpt5_client.preprocess import encode_png, preprocess_image


def png(colour, size=64) -> bytes:
    return encode_png(np.full((size, size, 3), colour, np.uint8))


RED, BLUE = png((255, 0, 0)), png((0, 0, 255))
USAGE = {"prompt_tokens": 12, "image_tokens": 0, "completion_tokens": 20, "vokens": 16, "images": 2}


def story() -> Document:
    events = [
        TextDelta("Once upon a time <b>a cat</b>."),
        ImageStart(30),
        TextDelta(" The end."),
        ImageEvent(RED, 30),
        ImageEvent(BLUE, 39),
        Final(USAGE, "stop"),
    ]
    return Document.from_events(events)


def test_images_sit_at_their_offsets():
    document = story()
    assert document.segments == ["Once upon a time <b>a cat</b>.", RED, " The end.", BLUE]
    assert document.text == "Once upon a time <b>a cat</b>. The end."
    assert document.images == [RED, BLUE]
    assert document.usage == USAGE and document.finish_reason == "stop"
    assert [image.getpixel((0, 0)) for image in document.pil_images()] == [(255, 0, 0), (0, 0, 255)]


def test_offsets_at_the_edges_and_shared():
    events = [ImageEvent(RED, 0), TextDelta("ab"), ImageEvent(BLUE, 99), ImageEvent(RED, 99), Final({}, "length")]
    assert Document.from_events(events).segments == [RED, "ab", BLUE, RED]


def test_image_event_to_pil():
    assert ImageEvent(BLUE, 0).to_pil().getpixel((1, 1)) == (0, 0, 255)


def test_markdown_links_png_files(tmp_path):
    path = story().save(tmp_path / "md", "md")
    assert path.name == "document.md"
    markdown = path.read_text()
    assert (
        markdown.index("Once upon")
        < markdown.index("![image 1](image_1.png)")
        < markdown.index("The end.")
        < markdown.index("![image 2](image_2.png)")
    )
    assert (tmp_path / "md" / "image_1.png").read_bytes() == RED
    assert (tmp_path / "md" / "image_2.png").read_bytes() == BLUE


class _PageScan(html.parser.HTMLParser):
    """Collects every URL-bearing attribute and the visible text."""

    def __init__(self):
        super().__init__()
        self.urls, self.tags, self.text = [], [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.urls += [value for name, value in attrs if name in ("src", "href", "srcset", "data", "poster")]

    def handle_data(self, data):
        self.text.append(data)


def test_html_is_one_self_contained_page(tmp_path):
    path = story().save(tmp_path / "html", "html")
    assert sorted(p.name for p in (tmp_path / "html").iterdir()) == ["document.html"]
    page = path.read_text()
    scan = _PageScan()
    scan.feed(page)
    assert "http://" not in page and "https://" not in page and "@import" not in page
    assert not {"script", "link", "iframe"} & set(scan.tags)
    prefix = "data:image/png;base64,"
    assert all(url.startswith(prefix) for url in scan.urls)
    assert [base64.b64decode(url[len(prefix) :]) for url in scan.urls] == [RED, BLUE]
    assert "Once upon a time <b>a cat</b>." in "".join(scan.text)  # escaped, shown as text


def test_json_keeps_segments_and_usage(tmp_path):
    path = story().save(tmp_path / "json", "json")
    saved = json.loads(path.read_text())
    assert saved["text"] == story().text and saved["usage"] == USAGE and saved["finish_reason"] == "stop"
    kinds = [segment["type"] for segment in saved["segments"]]
    assert kinds == ["text", "image", "text", "image"]
    assert base64.b64decode(saved["segments"][3]["data_base64"]) == BLUE


def test_unknown_format():
    with pytest.raises(InvalidArgument, match="md, html, json"):
        story().save("unused", "pdf")


def test_conversation_feeds_earlier_turns_and_images_back():
    conversation = Conversation()
    cat = np.full((224, 224, 3), 7, np.uint8)
    conversation.add_turn("A cat.", cat[None], Document(["It sleeps.", RED], USAGE, "stop"))
    conversation.add_turn("Go on.", np.zeros((0, 224, 224, 3), np.uint8), Document(["It wakes."], {}, "stop"))

    assert conversation.history() == [
        {"role": "human", "text": "A cat.", "num_images": 1},
        {"role": "assistant", "text": "It sleeps.", "num_images": 1},
        {"role": "human", "text": "Go on.", "num_images": 0},
        {"role": "assistant", "text": "It wakes.", "num_images": 0},
    ]
    images = conversation.images()
    assert images.shape == (2, 224, 224, 3)
    assert np.array_equal(images[0], cat)
    assert np.array_equal(images[1], preprocess_image(RED))  # the generated image, as the model takes it

    transcript = conversation.to_document()
    assert transcript.text.split() == [
        "You:",
        "A",
        "cat.",
        "MiniGPT-5:",
        "It",
        "sleeps.",
        "You:",
        "Go",
        "on.",
        "MiniGPT-5:",
        "It",
        "wakes.",
    ]
    assert len(transcript.images) == 2
    assert Image.open(io.BytesIO(transcript.images[0])).size == (224, 224)
