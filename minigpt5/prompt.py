"""Prompt rendering in upstream's two training formats, `vist` and `mmdialog`, with `<ImageHere>` slots.

A turn's text may place its images itself: each `<image>` marker (IMAGE_MARKER) in the text becomes the
next image's `<Img><ImageHere></Img>` block, in the order written; `\\<image>` is the literal text
`<image>`. A turn without markers gets its images where its format puts them (below). The strings are
upstream's, whitespace included (eric-ai-lab/MiniGPT-5 dataloader.py; tests/unit/test_prompt_golden.py
holds the expected strings):

- `vist` (dataloader.py:236-303, VISTDataset): `system + "###Human:" + story + " " + instruction +
  " ###Assistant:"`, where the story is each caption followed by its image block, then "\\n" (empty
  when there are no images: `"###Human: instruction ###Assistant:"`). In a turn's text, everything up
  to the last image before the last text is the story (captions without their surrounding spaces);
  the rest is the instruction (it may end with images, as upstream's "…by this image: <Img>…</Img>").
  Images without markers are a story of empty captions, before the text.
- `mmdialog` (dataloader.py:318-417, MMDialogDataset): `" ".join([system, "###Human: text", block,
  "###Assistant: text", …, "###Assistant:"])`: each turn is its role tag, its text and its image
  blocks, all joined by single spaces; images without markers come after the turn's text.

Earlier assistant turns (which VIST never trained on) are rendered MMDialog's way in both formats.

The prompt is returned as text pieces between image slots. Each piece is tokenised with special tokens
split, so nothing a user types can become `[IMG0]` or `<ImageHere>`; the image slots are the only
placeholder ids, and the decoder splices 32 image embeddings into each.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from .config import PROMPT_FORMATS
from .errors import InvalidRequest
from .tokenizer import encode_untrusted

ROLES = {"human": "Human", "assistant": "Assistant"}
IMAGE_MARKER = "<image>"
IMAGE = None  # an image slot among the text pieces
_MARKER = re.compile(r"\\<image>|<image>")


@dataclass(frozen=True)
class Turn:
    role: str  # "human" or "assistant"
    text: str  # may hold IMAGE_MARKER where this turn's images go
    num_images: int = 0  # this turn's images, in order

    def __post_init__(self):
        if self.role not in ROLES:
            raise InvalidRequest(f"history: role must be one of {sorted(ROLES)}, got {self.role!r}")
        if self.num_images < 0:
            raise InvalidRequest("history: num_images must be >= 0")


def count_markers(text: str) -> int:
    """`<image>` markers in a turn's text (escaped ones `\\<image>` do not count)."""
    return sum(1 for m in _MARKER.finditer(text) if m.group() == IMAGE_MARKER)


def split_markers(text: str) -> list[str | None]:
    """Text pieces and IMAGE slots in order, alternating, starting and ending with text; `\\<image>` → `<image>`."""
    segments: list[Any] = [""]  # str | None, but the last item is always text: `+=` on it is safe
    last = 0
    for match in _MARKER.finditer(text):
        segments[-1] += text[last : match.start()]
        if match.group() == IMAGE_MARKER:
            segments += [IMAGE, ""]
        else:
            segments[-1] += IMAGE_MARKER
        last = match.end()
    segments[-1] += text[last:]
    return segments


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


def check_markers(turns: list[Turn]) -> None:
    """A turn with markers must have one per image."""
    for index, turn in enumerate(turns):
        markers = count_markers(turn.text)
        if markers and markers != turn.num_images:
            field = "text_input" if index == len(turns) - 1 else f"history[{index}]"
            raise InvalidRequest(
                f"{field}: {markers} {IMAGE_MARKER} markers but the turn has {turn.num_images} "
                f"images (one marker per image, or none; write \\{IMAGE_MARKER} for the text)"
            )


def _segments(turn: Turn, images_first: bool) -> list[str | None]:
    if count_markers(turn.text):
        return split_markers(turn.text)
    text = split_markers(turn.text)[0]  # only escapes to undo
    if images_first:
        return [part for _ in range(turn.num_images) for part in ("", IMAGE)] + [text]
    return [text] + [part for _ in range(turn.num_images) for part in (IMAGE, "")]


class _Pieces:
    """Accumulates text; an image slot closes the current text piece."""

    def __init__(self) -> None:
        self.pieces: list[str | None] = []
        self.text = ""

    def add(self, part: str | None) -> None:
        if part is IMAGE:
            self.pieces += [self.text + "<Img>", IMAGE]
            self.text = "</Img>"
        else:
            self.text += part

    def done(self) -> list[str | None]:
        return self.pieces + [self.text]


def _vist_human(out: _Pieces, turn: Turn) -> None:
    """dataloader.py:260-268: "###Human:{prompt} {instruction} ###Assistant:", prompt = captions with
    their image blocks + "\\n" (empty without images)."""
    segments = _segments(turn, images_first=True)
    last_text = max((i for i, s in enumerate(segments) if s is not IMAGE and s.strip()), default=len(segments))
    story, instruction = segments[:last_text], segments[last_text:]
    out.add("###Human:")
    if IMAGE in story:
        for part in story:
            out.add(part if part is IMAGE else part.strip())
        out.add("\n")
    out.add(" ")
    texts: list[int | None] = [i for i, s in enumerate(instruction) if s is not IMAGE] or [None]
    for i, part in enumerate(instruction):
        if part is not IMAGE:
            part = part.lstrip() if i == texts[0] else part
            part = part.rstrip() if i == texts[-1] else part
        out.add(part)
    out.add(" ")


def _mmdialog_items(turn: Turn) -> list[str | None]:
    """dataloader.py:389-413: the role tag, then the turn's text and image blocks, to be joined by spaces."""
    items: list[str | None] = [f"###{ROLES[turn.role]}:"]
    for part in _segments(turn, images_first=False):
        if part is IMAGE or part.strip():
            items.append(part if part is IMAGE else part.strip())
    return items


def _add_joined(out: _Pieces, items: list[str | None]) -> None:
    for index, item in enumerate(items):
        if index:
            out.add(" ")
        out.add(item)


def render_pieces(fmt: str, system: str, turns: list[Turn]) -> list[str | None]:
    """Prompt text pieces; IMAGE (None) marks an image slot. Ends with '###Assistant:' for the model to answer."""
    if fmt not in PROMPT_FORMATS:
        raise ValueError(f"prompt format must be one of {sorted(PROMPT_FORMATS)}, got {fmt!r}")
    check_markers(turns)
    out = _Pieces()
    out.add(system)
    if fmt == "mmdialog":
        items = [item for turn in turns for item in _mmdialog_items(turn)]
        out.add(" ")
        _add_joined(out, items + ["###Assistant:"])
        return out.done()
    for turn in turns:
        if turn.role == "human":
            _vist_human(out, turn)
        else:
            _add_joined(out, _mmdialog_items(turn))
            out.add(" ")
    out.add("###Assistant:")
    return out.done()


def render_text(pieces: list[str | None], placeholder: str = "<ImageHere>") -> str:
    """The prompt as one string, each image slot written as `placeholder` (what upstream tokenises)."""
    return "".join(placeholder if piece is IMAGE else piece for piece in pieces)


def prompt_token_ids(tokenizer, pieces: list[str | None], bos_id: int, placeholder_id: int) -> list[int]:
    """BOS + tokenised pieces, with `placeholder_id` at each image slot (upstream mini_gpt5.py:182-230,
    `input_warp`: BOS embedding first, then the text around each `<ImageHere>`)."""
    ids = [bos_id]
    for piece in pieces:
        ids += [placeholder_id] if piece is IMAGE else encode_untrusted(tokenizer, piece)
    return ids
