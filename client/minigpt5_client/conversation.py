"""Multi-turn state: earlier turns, and their images in the order the server expects them; saved and
loaded as JSON; trimmed to what the server accepts."""

from __future__ import annotations

import base64
import io
import json
import math
import os
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from .contract import MAX_HISTORY_CHARS, MAX_HISTORY_TURNS, MAX_IMAGES
from .document import Document, Segment
from .preprocess import IMAGE_SIZE, encode_png, preprocess_images

FORMAT_VERSION = 1
IMAGE_POSITIONS = 32  # prompt positions of one image (its 32 query tokens)
CHARS_PER_POSITION = 3  # a cautious guess: LLaMA's tokenizer averages about 4 characters of English per id
TURN_POSITIONS = 16  # the template's markers around a turn, with room to spare


@dataclass
class Turn:
    role: str  # "human" or "assistant"
    text: str
    images: np.ndarray  # uint8 [k, 224, 224, 3]: what is sent back as context
    segments: list[Segment] = field(default_factory=list)  # what a transcript shows


class Conversation:
    """Pass as ``history=`` to Client.stream/generate: earlier turns and their images are sent first,
    and the turn is appended here once its answer is complete, generated images included, so that
    the next turn sees them (upstream writes stories this way, turn by turn).
    """

    def __init__(self, preprocess: str = "pad"):
        self.preprocess = preprocess  # for generated images fed back (square, so pad and crop agree)
        self.turns: list[Turn] = []

    def history(self) -> list[dict]:
        """The `history` input: ``[{"role", "text", "num_images"}]``, oldest first."""
        return [{"role": turn.role, "text": turn.text, "num_images": len(turn.images)} for turn in self.turns]

    def images(self) -> np.ndarray:
        """The earlier turns' images in turn order, uint8 [N, 224, 224, 3]."""
        arrays = [turn.images for turn in self.turns]
        return np.concatenate(arrays) if arrays else np.zeros((0, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)

    def add_turn(self, prompt: str, images: np.ndarray, answer: Document) -> None:
        """Record one exchange: the user's text and pre-processed images, and the model's answer."""
        self.turns.append(Turn("human", prompt, images, [prompt, *map(encode_png, images)]))
        answer_images = preprocess_images(answer.images, self.preprocess)
        self.turns.append(Turn("assistant", answer.text, answer_images, list(answer.segments)))

    # ---- trimming --------------------------------------------------------------------------------
    def trim(
        self,
        *,
        reserve_images: int = 0,
        reserve_positions: int = 0,
        context: int | None = None,
        max_images: int = MAX_IMAGES,
        max_turns: int = MAX_HISTORY_TURNS,
        max_chars: int = MAX_HISTORY_CHARS,
    ) -> int:
        """Drop the oldest exchanges (a user turn with its answer) until the history fits the server's
        limits with room for the next turn; returns how many turns went. It fits when it has at most
        ``max_turns`` turns and ``max_chars`` characters of text, at most ``max_images`` images counting
        the next turn's ``reserve_images`` (generated images are sent back, so they count), and, when
        ``context`` (the model's positions: 2048 for Vicuna-7B) is given, an estimated size plus
        ``reserve_positions`` (the next prompt and its max_tokens) within it. The estimate errs on the
        large side: 32 positions an image, one per 3 characters, 16 a turn; the server's own count
        decides in the end."""
        dropped = 0
        while self.turns and not self._fits(
            reserve_images, reserve_positions, context, max_images, max_turns, max_chars
        ):
            drop = 2 if len(self.turns) > 1 and self.turns[1].role == "assistant" else 1
            del self.turns[:drop]
            dropped += drop
        return dropped

    def estimated_positions(self) -> int:
        chars = sum(len(turn.text) for turn in self.turns)
        return (
            IMAGE_POSITIONS * sum(len(turn.images) for turn in self.turns)
            + math.ceil(chars / CHARS_PER_POSITION)
            + TURN_POSITIONS * len(self.turns)
        )

    def _fits(self, reserve_images, reserve_positions, context, max_images, max_turns, max_chars) -> bool:
        return (
            len(self.turns) <= max_turns
            and sum(len(turn.text) for turn in self.turns) <= max_chars
            and len(self.images()) + reserve_images <= max_images
            and (context is None or self.estimated_positions() + reserve_positions <= context)
        )

    # ---- saving ----------------------------------------------------------------------------------
    def to_json(self) -> dict:
        """The conversation as JSON-ready data; images as base64 PNG (lossless: they load back exactly)."""
        return {
            "format": "minigpt5-conversation",
            "version": FORMAT_VERSION,
            "preprocess": self.preprocess,
            "turns": [
                {
                    "role": turn.role,
                    "text": turn.text,
                    "images": [_b64_png(image) for image in turn.images],
                    "segments": [_segment_json(segment) for segment in turn.segments],
                }
                for turn in self.turns
            ],
        }

    @classmethod
    def from_json(cls, data: dict) -> Conversation:
        if not isinstance(data, dict) or data.get("format") != "minigpt5-conversation":
            raise ValueError("not a saved MiniGPT-5 conversation (format: minigpt5-conversation)")
        if data.get("version") != FORMAT_VERSION:
            raise ValueError(f"conversation format version {data.get('version')!r}; this client reads {FORMAT_VERSION}")
        conversation = cls(data.get("preprocess", "pad"))
        for index, turn in enumerate(data["turns"]):
            if turn.get("role") not in ("human", "assistant"):
                raise ValueError(f"turns[{index}].role: must be human or assistant, got {turn.get('role')!r}")
            images = [_png_pixels(text, f"turns[{index}].images") for text in turn.get("images", [])]
            pixels = np.stack(images) if images else np.zeros((0, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
            segments = [_segment_from_json(segment) for segment in turn.get("segments", [])]
            conversation.turns.append(Turn(turn["role"], str(turn.get("text", "")), pixels, segments))
        return conversation

    def save(self, path: str | os.PathLike) -> None:
        with open(path, "w", encoding="utf-8") as file:
            json.dump(self.to_json(), file)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Conversation:
        with open(path, encoding="utf-8") as file:
            return cls.from_json(json.load(file))

    def to_document(self) -> Document:
        """The whole conversation as one document (user images shown as sent: 224x224)."""
        segments: list[Segment] = []
        for turn in self.turns:
            speaker = "You" if turn.role == "human" else "MiniGPT-5"
            segments.append(f"\n{speaker}: ")
            segments.extend(turn.segments)
            segments.append("\n")
        return Document(_merge_text(segments))


def _merge_text(segments: list[Segment]) -> list[Segment]:
    merged: list[Segment] = []
    for segment in segments:
        if isinstance(segment, str) and merged and isinstance(merged[-1], str):
            merged[-1] += segment
        elif segment != "":
            merged.append(segment)
    return merged


def _b64_png(pixels: np.ndarray) -> str:
    return base64.b64encode(encode_png(pixels)).decode("ascii")


def _png_pixels(text: str, where: str) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(base64.b64decode(text, validate=True))) as image:
            pixels = np.asarray(image.convert("RGB"), dtype=np.uint8)
    except (ValueError, OSError) as exc:
        raise ValueError(f"{where}: not a base64 PNG ({exc})") from None
    if pixels.shape != (IMAGE_SIZE, IMAGE_SIZE, 3):
        raise ValueError(f"{where}: images are {IMAGE_SIZE}x{IMAGE_SIZE}, got {pixels.shape[1]}x{pixels.shape[0]}")
    return pixels


def _segment_json(segment: Segment) -> dict:
    return {"text": segment} if isinstance(segment, str) else {"image_png": base64.b64encode(segment).decode("ascii")}


def _segment_from_json(segment: dict) -> Segment:
    return segment["text"] if "text" in segment else base64.b64decode(segment["image_png"])
