"""The hand-off: after MiniGPT-5 has answered, the conversation with its text and images goes to a
second OpenAI-compatible model (GPT-4.1-mini, Gemini, ...), whose answer streams on in the same
response after a separator, its Deltas marked with its name.

OpenAI's chat API takes images only in user messages, so assistant images (earlier ones and
MiniGPT-5's new ones) travel as image parts of a user message right after the assistant's text,
where `[image N]` marks their places.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from ..document import Document
from .answer import Delta, ModelUsage
from .handoff_config import AUTO, HandoffConfig, HandoffTarget
from .images import png_data_url
from .messages import MARKDOWN_IMAGE, ChatTurn

ASSISTANT_IMAGES_NOTE = "The images of the assistant message above, in order:"


def choose_target(name: str | None, turns: list[ChatTurn], config: HandoffConfig) -> HandoffTarget | None:
    """The target a request named, or for "auto" the one the first matching route names."""
    if name == AUTO:
        name = config.route(route_facts(turns))
    return config.targets.get(name) if name else None


def route_facts(turns: list[ChatTurn]) -> dict[str, bool]:
    return {
        "follow_up": any(turn.role == "assistant" for turn in turns),
        "message_has_images": bool(turns[-1].images),
        "conversation_has_images": any(turn.images for turn in turns),
    }


def handoff_messages(messages: list[dict], answer: Document, instruction: str) -> list[dict]:
    """The conversation as received, then MiniGPT-5's answer and the instruction with its images."""
    converted = [part for message in messages for part in _for_handoff(message)]
    text, images, number = [], [], 0
    for segment in answer.segments:
        if isinstance(segment, str):
            text.append(segment)
        else:
            number += 1
            text.append(f"[image {number}]")
            images.append(_image_part(png_data_url(segment)))
    converted.append({"role": "assistant", "content": "".join(text)})
    converted.append({"role": "user", "content": [{"type": "text", "text": instruction}, *images]})
    return converted


def _for_handoff(message: dict) -> list[dict]:
    role, content = message.get("role"), message.get("content")
    if role != "assistant":
        kept = {key: message[key] for key in ("role", "content", "name") if message.get(key) is not None}
        return [kept]
    texts, urls = [], []
    for part in content if isinstance(content, list) else [content or ""]:
        if isinstance(part, str):
            texts.append(part)
        elif part.get("type") == "image_url":
            urls.append(_url(part["image_url"]))
        else:
            texts.append(part.get("text") or part.get("refusal") or "")
    urls += [_url(entry["image_url"]) for entry in message.get("images") or []]
    text = "".join(texts)
    urls += [match.group(1) for match in MARKDOWN_IMAGE.finditer(text)]
    converted: list[dict[str, Any]] = [{"role": "assistant", "content": MARKDOWN_IMAGE.sub("", text)}]
    if urls:
        converted.append(
            {"role": "user", "content": [{"type": "text", "text": ASSISTANT_IMAGES_NOTE}, *map(_image_part, urls)]}
        )
    return converted


def _url(image_url) -> str:
    return image_url["url"] if isinstance(image_url, dict) else image_url


def _image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


async def handoff_deltas(
    target: HandoffTarget, client, messages: list[dict], answer_length: int, separator: str, usage_out: list[ModelUsage]
) -> AsyncIterator[Delta]:
    """Stream the target's answer (``client``: an ``openai.AsyncOpenAI`` for it) after the separator;
    ``answer_length``: the characters of content sent before. Its usage goes to ``usage_out``."""
    marker = separator.format(model=target.name)
    start = answer_length + len(marker)  # where the target's own text begins in the whole content
    yield Delta(content=marker, handoff={"model": target.name, "content_offset": start}, model=target.name)
    stream = await client.chat.completions.create(
        model=target.model,
        messages=messages,
        stream=True,
        stream_options={"include_usage": True},
        extra_body=dict(target.extra_body) or None,
    )
    finish_reason, reported = "stop", None
    async with stream:
        async for chunk in stream:
            reported = chunk.usage or reported
            for choice in chunk.choices[:1]:
                finish_reason = choice.finish_reason or finish_reason
                images = _shifted((choice.delta.model_extra or {}).get("images") or [], start)
                if choice.delta.content or images:
                    yield Delta(content=choice.delta.content or "", images=images, model=target.name)
    usage_out.append(_usage(target, reported, finish_reason))


def _shifted(images: list[dict], by: int) -> list[dict]:
    """Images a target returned (another gateway does), their offsets moved into the whole answer."""
    return [
        {**image, "offset": image["offset"] + by} if isinstance(image.get("offset"), int) else image for image in images
    ]


def _usage(target: HandoffTarget, reported, finish_reason: str) -> ModelUsage:
    """The target's usage as it reported it (all None if it did not: not every endpoint does)."""
    if reported is None:
        return ModelUsage(target.name, None, None, finish_reason)
    prompt, completion = reported.prompt_tokens, reported.completion_tokens
    return ModelUsage(
        target.name,
        prompt,
        completion,
        finish_reason,
        _details(reported.prompt_tokens_details),
        _details(reported.completion_tokens_details),
        target.price.cost_usd(prompt, completion) if target.price else None,
    )


def _details(details) -> dict:
    return details.model_dump(exclude_none=True) if details is not None else {}
