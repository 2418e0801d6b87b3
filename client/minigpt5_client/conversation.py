"""Multi-turn state: earlier turns, and their images in the order the server expects them."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .document import Document, Segment
from .preprocess import IMAGE_SIZE, encode_png, preprocess_images


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
