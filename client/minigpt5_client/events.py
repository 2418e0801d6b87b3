"""The events a streamed answer is made of, and how one server response turns into them."""

from __future__ import annotations

import base64
import binascii
import io
import json
from collections.abc import Callable
from dataclasses import dataclass, field

from PIL import Image

from .errors import ServerError


@dataclass(frozen=True)
class TextDelta:
    """The next piece of the answer's text."""

    text: str


@dataclass(frozen=True)
class ImageStart:
    """The model emitted an image; it is being generated and will sit at ``offset`` in the text."""

    offset: int


@dataclass(frozen=True)
class ImageEvent:
    """A generated image (PNG) and the character offset in the answer's text where it sits."""

    image_png: bytes = field(repr=False)
    offset: int

    def to_pil(self) -> Image.Image:
        return Image.open(io.BytesIO(self.image_png))


@dataclass(frozen=True)
class Final:
    """The answer is complete. ``usage``: prompt_tokens, image_tokens, completion_tokens, vokens, images."""

    usage: dict
    finish_reason: str


Event = TextDelta | ImageStart | ImageEvent | Final


def events_from_outputs(output: Callable[[str], list]) -> list[Event]:
    """The events carried by one streamed response of `minigpt5` (docs/API.md, "Outputs").

    ``output(name)`` returns that output's elements as a flat list of str/int, [] when absent,
    so the gRPC and HTTP transports share this one reading of the protocol.
    """
    kind = next(iter(output("event_type")), "")
    events: list[Event] = []
    text = "".join(output("text_output"))
    if text:
        events.append(TextDelta(text))
    try:
        if kind == "image_start":
            events.append(ImageStart(int(output("image_offset")[0])))
        elif kind == "image":
            pngs, offsets = output("image_output"), output("image_offset")
            if len(pngs) != len(offsets):
                raise ValueError(f"{len(pngs)} images but {len(offsets)} offsets")
            events.extend(
                ImageEvent(base64.b64decode(png, validate=True), int(offset))
                for png, offset in zip(pngs, offsets, strict=True)
            )
        elif kind == "final":
            usage = output("usage")
            finish_reason = output("finish_reason")
            events.append(Final(json.loads(usage[0]) if usage else {}, finish_reason[0] if finish_reason else ""))
    except (IndexError, ValueError, binascii.Error) as error:  # json.JSONDecodeError is a ValueError
        raise ServerError(f"malformed {kind!r} event from the server: {error}") from None
    return events
