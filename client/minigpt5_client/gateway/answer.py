"""MiniGPT-5's events -> the pieces of an OpenAI answer (Delta ... then ModelUsage), in stream order.

Images are placed where the model put them: as `images` entries carrying their character `offset`
in the text (they arrive after the text around them, since text keeps streaming while an image is
decoded), or, with `inline_images`, as Markdown images written into the text at that offset; the
text after an image is then held back until the image is there.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..events import Event, Final, ImageEvent, ImageStart, TextDelta
from .images import png_data_url


@dataclass
class Delta:
    """A piece of the answer: text, images, or the mark where a hand-off model's answer begins."""

    content: str = ""
    images: list[dict] = field(default_factory=list)
    handoff: dict | None = None  # {"model": name, "content_offset": where its text starts}
    image_start: dict | None = None  # {"index": n, "offset": m}: image n (1-based) is being made, for offset m
    model: str | None = None  # who wrote it, when not MiniGPT-5


@dataclass
class ModelUsage:
    """One model's share of the answer: tokens, what it cost, why it stopped."""

    model: str
    prompt_tokens: int | None
    completion_tokens: int | None
    finish_reason: str
    prompt_tokens_details: dict = field(default_factory=dict)
    completion_tokens_details: dict = field(default_factory=dict)
    cost_usd: float | None = None


@dataclass(frozen=True)
class Finished:
    """The last item of an answer: why it ended and what each model used (MiniGPT-5 first)."""

    finish_reason: str
    usages: list[ModelUsage]


def inline_image(number: int, png: bytes) -> str:
    return f"\n\n![image {number}]({png_data_url(png)})\n\n"


class ImagePlacement:
    """Turns events into Deltas. Images past ``max_images`` are left out of the answer (the server has
    no input to skip them; its text goes on)."""

    def __init__(self, inline: bool, max_images: int | None):
        self.inline = inline
        self.max_images = max_images
        self.text_length = 0  # characters of model text received
        self.held = ""  # text after an inline image still being decoded
        self.held_from = 0  # offset of the first held character
        self.waiting = 0  # inline images started and not arrived
        self.started = 0
        self.delivered = 0
        self.final: Final | None = None

    def feed(self, event: Event) -> list[Delta]:
        if isinstance(event, TextDelta):
            return self._text(event.text)
        if isinstance(event, ImageStart):
            self.started += 1
            if not self._wanted(self.started):
                return []
            if not self.inline:  # announced, so that a client can show where it will sit while it is made
                return [Delta(image_start={"index": self.started, "offset": event.offset})]
            if not self.waiting:
                self.held_from = self.text_length
            self.waiting += 1
            return []
        if isinstance(event, ImageEvent):
            return self._image(event)
        if isinstance(event, Final):
            self.final = event
            return self._release(len(self.held))
        return []

    def _wanted(self, number: int) -> bool:
        return self.max_images is None or number <= self.max_images

    def _text(self, text: str) -> list[Delta]:
        self.text_length += len(text)
        if self.waiting:
            self.held += text
            return []
        return [Delta(content=text)]

    def _image(self, event: ImageEvent) -> list[Delta]:
        number = self.delivered + 1
        if not self._wanted(number):
            return []
        self.delivered = number
        if not self.inline:
            return [
                Delta(
                    images=[
                        {
                            "type": "image_url",
                            "image_url": {"url": png_data_url(event.image_png)},
                            "offset": event.offset,
                        }
                    ]
                )
            ]
        self.waiting = max(0, self.waiting - 1)
        deltas = self._release(max(0, event.offset - self.held_from))
        deltas.append(Delta(content=inline_image(number, event.image_png)))
        if not self.waiting:
            deltas += self._release(len(self.held))
        return deltas

    def _release(self, count: int) -> list[Delta]:
        text, self.held = self.held[:count], self.held[count:]
        self.held_from += len(text)
        return [Delta(content=text)] if text else []

    def usage(self, model: str) -> ModelUsage:
        """MiniGPT-5's usage in OpenAI's terms: prompt tokens include the image tokens, completion
        tokens the vokens (8 positions per image)."""
        served = self.final.usage if self.final else {}
        image_tokens = served.get("image_tokens", 0)
        details = {"vokens": served.get("vokens", 0), "images": self.delivered}
        if self.started > self.delivered:
            details["images_left_out"] = self.started - self.delivered
        return ModelUsage(
            model,
            served.get("prompt_tokens", 0) + image_tokens,
            served.get("completion_tokens", 0),
            self.final.finish_reason if self.final else "stop",
            prompt_tokens_details={"image_tokens": image_tokens},
            completion_tokens_details=details,
        )
