"""One chat completion: the images loaded, MiniGPT-5's answer streamed, then the hand-off if asked.

`Backends` holds what a gateway process keeps open: one asyncio gRPC channel to Triton (every
request is a call on it: no thread per request), an HTTP client for allowed image URLs, and an
OpenAI client per hand-off model.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from ..client import AsyncClient
from ..document import Document
from ..events import ImageEvent
from .answer import Delta, Finished, ImagePlacement, ModelUsage
from .chat_request import ChatRequest
from .errors import GatewayError
from .handoff import choose_target, handoff_deltas, handoff_messages
from .images import load_pixels
from .settings import GatewaySettings

if TYPE_CHECKING:
    import httpx

log = logging.getLogger("minigpt5.gateway")


@dataclass
class Backends:
    settings: GatewaySettings
    triton: AsyncClient
    http: httpx.AsyncClient | None = None  # when image hosts are allowed
    handoff_clients: dict = field(default_factory=dict)  # target name -> openai.AsyncOpenAI
    unavailable: dict = field(default_factory=dict)  # target name -> why it cannot be used

    @classmethod
    def open(cls, settings: GatewaySettings) -> Backends:
        """Create the clients (inside the running event loop: the gRPC channel belongs to it)."""
        backends = cls(settings, AsyncClient(settings.triton_url, timeout=settings.timeout_s))
        if settings.image_hosts:
            import httpx

            backends.http = httpx.AsyncClient()
        for target in settings.handoff.targets.values():
            key = target.api_key()
            if target.api_key_env and not key:
                backends.unavailable[target.name] = f"${target.api_key_env} is not set on the gateway"
                log.warning("hand-off model %s is not available: %s", target.name, backends.unavailable[target.name])
                continue
            from openai import AsyncOpenAI

            backends.handoff_clients[target.name] = AsyncOpenAI(
                base_url=target.base_url, api_key=key or "unused", timeout=settings.timeout_s
            )
        return backends

    async def close(self) -> None:
        await self.triton.close()
        if self.http is not None:
            await self.http.aclose()
        for client in self.handoff_clients.values():
            await client.close()


async def answer(chat: ChatRequest, backends: Backends) -> AsyncIterator[Delta | Finished]:
    """The answer's Deltas in stream order, then Finished. Raises the thin client's errors (and
    GatewayError for the gateway's own refusals) before or during the stream."""
    settings = backends.settings
    target = choose_target(chat.handoff, chat.turns, settings.handoff)
    if target is not None and target.name not in backends.handoff_clients:
        raise GatewayError(
            503,
            f"hand-off model {target.name} is not available: {backends.unavailable[target.name]}",
            param="model",
            code="handoff_unavailable",
        )
    pixels = await load_pixels([ref for turn in chat.turns for ref in turn.images], chat.preprocess, backends.http)
    history = [{"role": turn.role, "text": turn.text, "num_images": len(turn.images)} for turn in chat.history]
    placement = ImagePlacement(chat.inline_images, chat.max_images)
    seen = []  # the events, for the hand-off's document
    length = 0  # characters of content sent
    async for event in backends.triton.stream(chat.message.text, pixels, history, **chat.params):
        delivered = placement.delivered
        for delta in placement.feed(event):
            length += len(delta.content)
            yield delta
        if target is not None and (not isinstance(event, ImageEvent) or placement.delivered > delivered):
            seen.append(event)  # the hand-off sees what the client got: no image left out by max_images
    usages = [_priced(placement.usage(settings.model_name), settings)]
    if target is not None:
        messages = handoff_messages(chat.messages, Document.from_events(seen), settings.handoff.instruction)
        async for delta in handoff_deltas(
            target, backends.handoff_clients[target.name], messages, length, settings.handoff.separator, usages
        ):
            yield delta
    yield Finished(usages[-1].finish_reason, usages)


def _priced(usage: ModelUsage, settings: GatewaySettings) -> ModelUsage:
    price = settings.handoff.minigpt5_price
    if price is None or usage.prompt_tokens is None or usage.completion_tokens is None:
        return usage
    return replace(usage, cost_usd=price.cost_usd(usage.prompt_tokens, usage.completion_tokens))
