"""The answer in OpenAI's JSON: `chat.completion` objects, `chat.completion.chunk` SSE events, usage.

Ours on top of OpenAI's shape: `images` in the message / delta (entries `{"type": "image_url",
"image_url": {"url": "data:image/png;base64,..."}, "offset": N}`, N = the character in `content`
where the image sits), `handoff` (`{"model", "content_offset"}`: where the hand-off model's text
starts), usage `completion_tokens_details` (`vokens`, `images`), and `usage.models`: one line per
model with its tokens and `cost_usd`. Streamed only: `image_start` (`{"index", "offset"}`) in the delta
sent when the model begins an image, before the image's own delta (the decoding takes a while).
"""

from __future__ import annotations

import functools
import json
import secrets
import time
from dataclasses import dataclass
from json.encoder import encode_basestring_ascii

from .answer import Delta, Finished, ModelUsage

_CONTENT_SUFFIX = '},"finish_reason":null,"logprobs":null}]}\n\n'


@dataclass
class CompletionIds:
    id: str
    created: int
    model: str

    @classmethod
    def new(cls, model: str) -> CompletionIds:
        return cls(f"chatcmpl-{secrets.token_hex(12)}", int(time.time()), model)

    @functools.cached_property
    def content_prefix(self) -> str:
        """A text chunk up to its content's value (what _chunk writes, prepared once per answer)."""
        head = json.dumps(
            {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model},
            separators=(",", ":"),
        )
        return f'data: {head[:-1]},"choices":[{{"index":0,"delta":{{"content":'


def completion_json(ids: CompletionIds, deltas: list[Delta], finished: Finished) -> dict:
    """The whole answer (stream=false)."""
    message: dict = {"role": "assistant", "content": "".join(delta.content for delta in deltas), "refusal": None}
    images = [image for delta in deltas for image in delta.images]
    if images:
        message["images"] = images
    handoff = next((delta.handoff for delta in deltas if delta.handoff), None)
    if handoff:
        message["handoff"] = handoff
    return {
        "id": ids.id,
        "object": "chat.completion",
        "created": ids.created,
        "model": ids.model,
        "choices": [{"index": 0, "message": message, "finish_reason": finished.finish_reason, "logprobs": None}],
        "usage": usage_json(finished.usages),
    }


def role_chunk(ids: CompletionIds) -> str:
    return _chunk(ids, {"role": "assistant", "content": ""})


def delta_chunk(ids: CompletionIds, delta: Delta) -> str:
    if not (delta.images or delta.handoff or delta.model or delta.image_start):  # once per token: no dict, no dumps
        return f"{ids.content_prefix}{encode_basestring_ascii(delta.content)}{_CONTENT_SUFFIX}"
    body: dict = (
        {"content": delta.content} if delta.content or not (delta.images or delta.handoff or delta.image_start) else {}
    )
    if delta.image_start:
        body["image_start"] = delta.image_start
    if delta.images:
        body["images"] = delta.images
    if delta.handoff:
        body["handoff"] = delta.handoff
    return _chunk(ids, body, model=delta.model)


def finish_chunk(ids: CompletionIds, finished: Finished) -> str:
    return _chunk(ids, {}, finish_reason=finished.finish_reason)


def usage_chunk(ids: CompletionIds, finished: Finished) -> str:
    return _sse(
        {
            "id": ids.id,
            "object": "chat.completion.chunk",
            "created": ids.created,
            "model": ids.model,
            "choices": [],
            "usage": usage_json(finished.usages),
        }
    )


def error_event(body: dict) -> str:
    return _sse(body)


DONE = "data: [DONE]\n\n"


def usage_json(usages: list[ModelUsage]) -> dict:
    """Totals over the models (MiniGPT-5's details), and one line per model with its cost."""
    first = usages[0]
    prompt = sum(usage.prompt_tokens or 0 for usage in usages)
    completion = sum(usage.completion_tokens or 0 for usage in usages)
    costs = [usage.cost_usd for usage in usages if usage.cost_usd is not None]
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": first.prompt_tokens_details,
        "completion_tokens_details": first.completion_tokens_details,
        "cost_usd": round(sum(costs), 8) if len(costs) == len(usages) else None,
        "models": [_model_line(usage) for usage in usages],
    }


def _model_line(usage: ModelUsage) -> dict:
    prompt, completion = usage.prompt_tokens, usage.completion_tokens
    total = None if prompt is None or completion is None else prompt + completion
    return {
        "model": usage.model,
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": total,
        "prompt_tokens_details": usage.prompt_tokens_details,
        "completion_tokens_details": usage.completion_tokens_details,
        "finish_reason": usage.finish_reason,
        "cost_usd": usage.cost_usd,
    }


def _chunk(ids: CompletionIds, delta: dict, *, finish_reason: str | None = None, model: str | None = None) -> str:
    return _sse(
        {
            "id": ids.id,
            "object": "chat.completion.chunk",
            "created": ids.created,
            "model": model or ids.model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}],
        }
    )


def _sse(body: dict) -> str:
    return f"data: {json.dumps(body, separators=(',', ':'))}\n\n"
