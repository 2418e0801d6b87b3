"""What crosses the link between `minigpt5` and `vicuna_decoder`, in both directions. No Triton here.

One unary call per engine step (decoder_link.py drives it, vicuna_decoder_model.py answers it):

  in   `link_id`       STRING [1]      the calling `minigpt5` instance (each has its own outbox)
       `commands`      STRING [1]      JSON {"submit": [NewRequest...], "abort": [request ids]}; a
                                       request's `image_keys` name its images for the prefix cache
       `image_embeds`  FP32 [rows, H]  the submitted requests' image embeddings, 32 rows per image, in
                                       order (absent when no submitted request has an image)
  out  `events`        STRING [1]      JSON list of events since the last call (text, vokens,
                                       finished, refused, failed), per request in order
       `voken_states`  FP32 [n, 8, H]  the states of the "vokens" events, in order

Text is detokenised in the decoder (its stop check needs the text); deltas a request produced since
the last call travel merged into one event.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..config import NUM_QUERY_TOKENS
from ..engine import Finished, TextDelta, VokenStates
from ..errors import InvalidRequest, Overloaded
from ..sampling import SamplingParams

FINISHED_LEFT_OUT = ("request_id", "text", "token_ids")  # Finished fields that do not cross the link


@dataclass
class NewRequest:
    request_id: str
    prompt_ids: list[int]
    sampling: SamplingParams
    image_embeds: np.ndarray | None = None  # [images, 32, H]: one block per placeholder in the prompt
    image_keys: list[str] | None = None  # content key of each image's embeddings (None: the decoder hashes them)

    @property
    def images(self) -> int:
        return 0 if self.image_embeds is None else len(self.image_embeds)


@dataclass
class Commands:
    submit: list[NewRequest] = field(default_factory=list)
    abort: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.submit or self.abort)


@dataclass
class Failure:
    """A request the decoder ends with an error: refused (InvalidRequest), unloading (Overloaded), or a
    failed step (anything else)."""

    request_id: str
    error: Exception


# ---- minigpt5 → vicuna_decoder ------------------------------------------------------------------
def encode_commands(commands: Commands) -> tuple[str, np.ndarray | None]:
    body = {
        "submit": [
            {
                "id": r.request_id,
                "prompt_ids": r.prompt_ids,
                "images": r.images,
                "image_keys": r.image_keys,
                "sampling": dataclasses.asdict(r.sampling),
            }
            for r in commands.submit
        ],
        "abort": commands.abort,
    }
    blocks = [e.reshape(-1, e.shape[-1]) for e in (r.image_embeds for r in commands.submit) if e is not None and len(e)]
    return json.dumps(body), np.concatenate(blocks).astype(np.float32, copy=False) if blocks else None


def decode_commands(text: str, image_embeds: np.ndarray | None) -> Commands:
    body = json.loads(text)
    commands, row = Commands(abort=list(body.get("abort", []))), 0
    for item in body.get("submit", []):
        embeds = None
        if item["images"]:
            if image_embeds is None:
                raise InvalidRequest(f"image_embeds: missing, request {item['id']} has {item['images']} images")
            rows = NUM_QUERY_TOKENS * item["images"]
            embeds = image_embeds[row : row + rows].reshape(item["images"], NUM_QUERY_TOKENS, -1)
            row += rows
        commands.submit.append(
            NewRequest(
                item["id"], item["prompt_ids"], SamplingParams(**item["sampling"]), embeds, item.get("image_keys")
            )
        )
    return commands


# ---- vicuna_decoder → minigpt5 ------------------------------------------------------------------
def encode_events(events: list) -> tuple[str, np.ndarray | None]:
    """Engine events and Failures → outputs."""
    items: list[dict[str, Any]] = []
    states: list[np.ndarray] = []
    for event in _merge_text(events):
        if isinstance(event, TextDelta):
            items.append({"id": event.request_id, "type": "text", "text": event.text})
        elif isinstance(event, VokenStates):
            items.append({"id": event.request_id, "type": "vokens", "offset": event.text_offset})
            states.append(np.asarray(event.states, dtype=np.float32))
        elif isinstance(event, Finished):  # every count; the whole text and the ids the link does not need
            counts = {k: v for k, v in dataclasses.asdict(event).items() if k not in FINISHED_LEFT_OUT}
            items.append({"id": event.request_id, "type": "finished", **counts})
        else:
            items.append({"id": event.request_id, "type": _failure_kind(event.error), "message": str(event.error)})
    return json.dumps(items), np.stack(states) if states else None


def decode_events(text: str, voken_states: np.ndarray | None) -> list:
    """Outputs → TextDelta, VokenStates (states as numpy), Finished and Failure (InvalidRequest,
    Overloaded or RuntimeError)."""
    events: list[Any] = []
    state = 0
    for item in json.loads(text):
        kind, request_id = item["type"], item["id"]
        if kind == "text":
            events.append(TextDelta(request_id, item["text"]))
        elif kind == "vokens":
            if voken_states is None:
                raise RuntimeError("voken_states: missing for a vokens event")
            events.append(VokenStates(request_id, voken_states[state], item["offset"]))
            state += 1
        elif kind == "finished":
            counts = {k: v for k, v in item.items() if k not in ("id", "type")}
            events.append(Finished(request_id=request_id, text="", **counts))
        else:
            error = {"refused": InvalidRequest, "unavailable": Overloaded, "failed": RuntimeError}[kind]
            events.append(Failure(request_id, error(item["message"])))
    return events


def _failure_kind(error: Exception) -> str:
    if isinstance(error, InvalidRequest):
        return "refused"
    return "unavailable" if isinstance(error, Overloaded) else "failed"


def _merge_text(events: list) -> list:
    """Consecutive text deltas of one request (no other event of it between) become one."""
    merged: list = []
    open_text: dict[str, int] = {}  # request id → index of its text delta that may still grow
    for event in events:
        request_id = event.request_id
        if isinstance(event, TextDelta) and request_id in open_text:
            index = open_text[request_id]
            merged[index] = TextDelta(request_id, merged[index].text + event.text)
            continue
        open_text.pop(request_id, None)
        if isinstance(event, TextDelta):
            open_text[request_id] = len(merged)
        merged.append(event)
    return merged
