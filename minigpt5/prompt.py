"""Vicuna-V0 prompt template with `<Img><ImageHere></Img>` blocks (MINIGPT5.md §2).

The prompt is rendered as text pieces between image slots. Each piece is tokenised with special
tokens split, so nothing a user types can become `[IMG0]` or `<ImageHere>`; the image slots are the
only placeholder ids, and the decoder splices 32 image embeddings into each.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

from .errors import InvalidRequest
from .tokenizer import encode_untrusted

ROLES = {"human": "Human", "assistant": "Assistant"}


@dataclass(frozen=True)
class Turn:
    role: str  # "human" or "assistant"
    text: str
    num_images: int = 0  # images shown at the start of this turn, in order

    def __post_init__(self):
        if self.role not in ROLES:
            raise InvalidRequest(f"history: role must be one of {sorted(ROLES)}, got {self.role!r}")
        if self.num_images < 0:
            raise InvalidRequest("history: num_images must be >= 0")


def parse_history(history_json: str | None) -> list[Turn]:
    """`history` input: JSON list of {"role", "text", "num_images"} objects, oldest first."""
    if not history_json:
        return []
    try:
        items = json.loads(history_json)
    except json.JSONDecodeError as exc:
        raise InvalidRequest(f"history: not valid JSON ({exc.msg} at position {exc.pos})") from None
    if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
        raise InvalidRequest("history: must be a JSON list of objects")
    turns = []
    for i, item in enumerate(items):
        text, num_images = item.get("text", ""), item.get("num_images", 0)
        if not isinstance(text, str) or not isinstance(num_images, int) or isinstance(num_images, bool):
            raise InvalidRequest(f"history[{i}]: text must be a string and num_images an integer")
        turns.append(Turn(str(item.get("role")), text, num_images))
    return turns


def render_pieces(system: str, turns: list[Turn]) -> list[str | None]:
    """Prompt text pieces; None marks an image slot. Ends with '###Assistant:' for the model to answer."""
    pieces: list[str | None] = []
    text = system
    for turn in turns:
        text += f"###{ROLES[turn.role]}: "
        for _ in range(turn.num_images):
            pieces += [text + "<Img>", None]
            text = "</Img> "
        text += turn.text + " "
    pieces.append(text + "###Assistant:")
    return pieces


def prompt_token_ids(tokenizer, pieces: list[str | None], bos_id: int, placeholder_id: int) -> list[int]:
    """BOS + tokenised pieces, with `placeholder_id` at each image slot."""
    ids = [bos_id]
    for piece in pieces:
        ids += [placeholder_id] if piece is None else encode_untrusted(tokenizer, piece)
    return ids
