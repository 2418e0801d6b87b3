"""An interleaved answer (text and images in reading order) and how to save it as Markdown, HTML or JSON."""

from __future__ import annotations

import base64
import html
import io
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from .errors import InvalidArgument
from .events import Event, Final, ImageEvent, TextDelta

SAVE_FORMATS = ("md", "html", "json")

Segment = str | bytes  # a piece of text, or a PNG image


@dataclass
class Document:
    """Text and PNG images in reading order, plus the server's usage figures."""

    segments: list[Segment] = field(default_factory=list)
    usage: dict = field(default_factory=dict)
    finish_reason: str = ""

    @classmethod
    def from_events(cls, events: Iterable[Event]) -> Document:
        """Assemble a streamed answer: each image goes to its character offset in the whole text."""
        text, images, usage, finish_reason = [], [], {}, ""
        for event in events:
            if isinstance(event, TextDelta):
                text.append(event.text)
            elif isinstance(event, ImageEvent):
                images.append(event)
            elif isinstance(event, Final):
                usage, finish_reason = event.usage, event.finish_reason
        full_text = "".join(text)
        segments: list[Segment] = []
        start = 0
        for image in sorted(images, key=lambda image: image.offset):  # stable: equal offsets keep stream order
            offset = min(max(image.offset, start), len(full_text))
            if offset > start:
                segments.append(full_text[start:offset])
            segments.append(image.image_png)
            start = offset
        if start < len(full_text):
            segments.append(full_text[start:])
        return cls(segments, usage, finish_reason)

    @property
    def text(self) -> str:
        return "".join(segment for segment in self.segments if isinstance(segment, str))

    @property
    def images(self) -> list[bytes]:
        """The images as PNG bytes, in reading order."""
        return [segment for segment in self.segments if isinstance(segment, bytes)]

    def pil_images(self) -> list[Image.Image]:
        return [Image.open(io.BytesIO(png)) for png in self.images]

    def save(self, out_dir: str | Path, format: str = "md") -> Path:
        """Write the document into ``out_dir`` (created if needed); returns the main file's path.

        md: document.md plus image_1.png, image_2.png, ... that it links;
        html: document.html, one self-contained page (images as data: URIs, nothing fetched);
        json: document.json, segments with base64 PNGs, usage and finish_reason.
        """
        if format not in SAVE_FORMATS:
            raise InvalidArgument(f"format must be one of {', '.join(SAVE_FORMATS)}, got {format!r}")
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / f"document.{format}"
        if format == "md":
            for number, png in enumerate(self.images, start=1):
                (out_dir / f"image_{number}.png").write_bytes(png)
            path.write_text(self.to_markdown(), encoding="utf-8")
        elif format == "html":
            path.write_text(self.to_html(), encoding="utf-8")
        else:
            path.write_text(json.dumps(self.to_json(), ensure_ascii=False, indent=1), encoding="utf-8")
        return path

    def to_markdown(self) -> str:
        """Markdown linking the images as image_1.png, image_2.png, ... (written next to it by save)."""
        parts, number = [], 0
        for segment in self.segments:
            if isinstance(segment, str):
                parts.append(segment)
            else:
                number += 1
                parts.append(f"\n\n![image {number}](image_{number}.png)\n\n")
        return "".join(parts).strip() + "\n"

    def to_html(self, title: str = "MiniGPT-5") -> str:
        body, number = [], 0
        for segment in self.segments:
            if isinstance(segment, str):
                body.append(f'<p class="text">{html.escape(segment)}</p>')
            else:
                number += 1
                data = base64.b64encode(segment).decode("ascii")
                body.append(f'<figure><img alt="image {number}" src="data:image/png;base64,{data}"></figure>')
        usage = html.escape(", ".join(f"{key}: {value}" for key, value in self.usage.items()))
        return _HTML_PAGE.format(title=html.escape(title), body="\n".join(body), usage=usage)

    def to_json(self) -> dict:
        segments = [
            {"type": "text", "text": segment}
            if isinstance(segment, str)
            else {"type": "image", "mime_type": "image/png", "data_base64": base64.b64encode(segment).decode("ascii")}
            for segment in self.segments
        ]
        return {"text": self.text, "segments": segments, "usage": self.usage, "finish_reason": self.finish_reason}


_HTML_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>
body {{ max-width: 46rem; margin: 2rem auto; padding: 0 1rem; font: 1.05rem/1.6 Georgia, serif; color: #222; }}
.text {{ white-space: pre-wrap; margin: 0.5rem 0; }}
figure {{ margin: 1rem 0; text-align: center; }}
img {{ max-width: 100%; height: auto; border-radius: 4px; }}
footer {{ margin-top: 2rem; color: #777; font: 0.8rem sans-serif; }}
</style>
</head>
<body>
<main>
{body}
</main>
<footer>{usage}</footer>
</body>
</html>
"""
