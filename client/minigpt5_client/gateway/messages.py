"""OpenAI chat `messages` -> the model's turns: text and images per turn, earlier turns as history.

MiniGPT-5 knows two roles (`human`, `assistant`) and places a turn's images before its text, in
order. So: system (and developer) messages are put before the first user message's text;
consecutive messages of one role become one turn; a user message's image parts keep their order.
Assistant images come back as the gateway returned them: `images` entries, `image_url` parts, or
Markdown data-URL images in the text (the `inline_images` form), so a client can send a
conversation back exactly as it received it.
"""

from __future__ import annotations

import base64
import binascii
import re
import urllib.parse
from dataclasses import dataclass, field

from .errors import bad_request

# "\n\n![alt](data:image/...;base64,...)\n\n", as the gateway writes inline images (answer.inline_image)
MARKDOWN_IMAGE = re.compile(r"(?:\n\n)?!\[[^\]\n]*\]\((data:image/[a-zA-Z0-9.+-]+;base64,[A-Za-z0-9+/=\s]+)\)(?:\n\n)?")
_MESSAGE_FIELDS = {"role", "content", "name", "images", "refusal", "annotations"}
_UNSUPPORTED_FIELDS = {"tool_calls", "function_call", "audio", "tool_call_id"}
_ROLES = {"system": "system", "developer": "system", "user": "human", "assistant": "assistant"}


@dataclass(frozen=True)
class ImageRef:
    """One image of the conversation: decoded bytes of a data: URL, or an allowed http(s) URL to fetch."""

    field: str  # where it was in the request, for error messages: messages[1].content[2].image_url
    data: bytes | None = None
    url: str | None = None


@dataclass
class ChatTurn:
    role: str  # "human" or "assistant"
    text: str
    images: list[ImageRef] = field(default_factory=list)


def parse_messages(messages, image_hosts: tuple[str, ...]) -> list[ChatTurn]:
    """The conversation as turns, oldest first; the last one is the user's new message."""
    if not isinstance(messages, list) or not messages:
        raise bad_request("messages", "must be a non-empty list of messages")
    system: list[str] = []
    turns: list[ChatTurn] = []
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            raise bad_request(where, "must be an object with `role` and `content`")
        role = _ROLES.get(str(message.get("role")))
        if role is None:
            raise bad_request(
                f"{where}.role",
                f"must be system, developer, user or assistant, got {message.get('role')!r} (tools are not supported)",
            )
        _refuse_unsupported_message_fields(message, where)
        text, images = _content(message, where, role, image_hosts)
        if role == "system":
            system.append(text)
        elif turns and turns[-1].role == role:
            turns[-1].text = "\n\n".join(part for part in (turns[-1].text, text) if part)
            turns[-1].images.extend(images)
        else:
            turns.append(ChatTurn(role, text, images))
    if not turns or turns[-1].role != "human":
        raise bad_request("messages", "the last message must be the user's (MiniGPT-5 answers a user message)")
    if not turns[-1].text.strip():
        raise bad_request(
            f"messages[{len(messages) - 1}].content",
            "the last user message has no text; MiniGPT-5 needs a text prompt next to any images",
        )
    if system:
        first = next(turn for turn in turns if turn.role == "human")
        first.text = "\n\n".join([*system, first.text])
    return turns


def _refuse_unsupported_message_fields(message: dict, where: str) -> None:
    """Tool and audio fields, and unknown ones, are refused when they hold something (an SDK's dump of
    a returned message carries them empty)."""
    for name, value in message.items():
        if name in _MESSAGE_FIELDS or value in (None, "", [], {}):
            continue
        reason = "not supported (MiniGPT-5 has no tools or audio)" if name in _UNSUPPORTED_FIELDS else "unknown field"
        raise bad_request(f"{where}.{name}", reason)


def _content(message: dict, where: str, role: str, image_hosts) -> tuple[str, list[ImageRef]]:
    content = message.get("content")
    texts: list[str] = []
    images: list[ImageRef] = []
    if isinstance(content, str):
        texts.append(content)
    elif isinstance(content, list):
        for number, part in enumerate(content):
            _part(part, f"{where}.content[{number}]", role, image_hosts, texts, images)
    elif content is not None or role != "assistant":
        raise bad_request(f"{where}.content", "must be a string or a list of content parts")
    if role == "assistant":
        images.extend(_returned_images(message.get("images"), f"{where}.images", image_hosts))
        texts = [_take_markdown_images(text, f"{where}.content", images) for text in texts]
    elif message.get("images"):
        raise bad_request(
            f"{where}.images", "only assistant messages carry `images`; send user images as image_url content parts"
        )
    return "".join(texts), images


def _part(part, where: str, role: str, image_hosts, texts: list[str], images: list[ImageRef]) -> None:
    kind = part.get("type") if isinstance(part, dict) else None
    if kind == "text" and isinstance(part.get("text"), str):
        texts.append(part["text"])
    elif kind == "refusal" and role == "assistant" and isinstance(part.get("refusal"), str):
        texts.append(part["refusal"])
    elif kind == "image_url" and role != "system":
        images.append(image_ref(part.get("image_url"), f"{where}.image_url", image_hosts))
    else:
        allowed = "text" if role == "system" else "text or image_url"
        raise bad_request(f"{where}.type", f"content parts here must be {allowed} (with their fields), got {kind!r}")


def _returned_images(entries, where: str, image_hosts) -> list[ImageRef]:
    if entries is None:
        return []
    if not isinstance(entries, list):
        raise bad_request(where, 'must be a list of {"type": "image_url", "image_url": {"url": ...}}')
    refs = []
    for number, entry in enumerate(entries):
        if not isinstance(entry, dict) or entry.get("type", "image_url") != "image_url":
            raise bad_request(f"{where}[{number}]", 'must be {"type": "image_url", "image_url": {"url": ...}}')
        refs.append(image_ref(entry.get("image_url"), f"{where}[{number}].image_url", image_hosts))
    return refs


def _take_markdown_images(text: str, where: str, images: list[ImageRef]) -> str:
    """Inline data-URL images out of an assistant's text into its images, in order."""
    for match in MARKDOWN_IMAGE.finditer(text):
        images.append(_data_url_image(match.group(1), where))
    return MARKDOWN_IMAGE.sub("", text)


def image_ref(image_url, where: str, image_hosts: tuple[str, ...]) -> ImageRef:
    """An `image_url` value ({"url": ..., "detail": ...} or a bare string) -> ImageRef."""
    url = image_url.get("url") if isinstance(image_url, dict) else image_url
    if not isinstance(url, str) or not url:
        raise bad_request(f"{where}.url", "required: a data: URL (or an http(s) URL of an allowed host)")
    if url.startswith("data:"):
        return _data_url_image(url, f"{where}.url")
    scheme, host = _scheme_and_host(url)
    if scheme not in ("http", "https"):
        raise bad_request(f"{where}.url", f"must be a data: or http(s) URL, got a {scheme or 'relative'} URL")
    if not host_allowed(host, image_hosts):
        raise bad_request(
            f"{where}.url",
            f"http(s) image URLs are fetched only from allowed hosts and {host!r} is "
            "not one; send the image as a data: URL",
        )
    return ImageRef(f"{where}.url", url=url)


def host_allowed(host: str, image_hosts: tuple[str, ...]) -> bool:
    """Exact host names, or `*.example.com` for its subdomains."""
    host = host.lower()
    for allowed in image_hosts:
        allowed = allowed.lower()
        if host == allowed or (allowed.startswith("*.") and host.endswith(allowed[1:])):
            return True
    return False


def _scheme_and_host(url: str) -> tuple[str, str]:
    try:
        parts = urllib.parse.urlsplit(url)
        return parts.scheme.lower(), parts.hostname or ""
    except ValueError:
        return "", ""


def _data_url_image(url: str, where: str) -> ImageRef:
    header, comma, payload = url.partition(",")
    media_type = header[len("data:") :].split(";")[0].lower()
    if not comma or ";base64" not in header.lower():
        raise bad_request(where, "a data: URL must be base64 (data:image/png;base64,...)")
    if media_type and not media_type.startswith("image/"):
        raise bad_request(where, f"a data: URL must hold an image, got {media_type}")
    try:
        data = base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError):
        raise bad_request(where, "the data: URL's payload is not valid base64") from None
    return ImageRef(where, data=data)
