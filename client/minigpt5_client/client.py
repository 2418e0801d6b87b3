"""The Python API: Client (synchronous) and AsyncClient (asyncio), over gRPC (default) or HTTP."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from .conversation import Conversation
from .document import Document
from .errors import InvalidArgument, ServerError
from .events import Event, Final
from .preprocess import IMAGE_SIZE, PREPROCESS_MODES, ImageSource, preprocess_images
from .request import GenerateRequest, build_request

PROTOCOLS = ("grpc", "http")
DEFAULT_PORTS = {"grpc": 8001, "http": 8000}
DEFAULT_TIMEOUT_S = 300.0

Images = ImageSource | Iterable[ImageSource]  # one source, several, or pre-processed uint8 [N, 224, 224, 3]
History = Conversation | Sequence[dict] | None


class _ClientBase:
    def __init__(self, url: str | None = None, protocol: str = "grpc", timeout: float = DEFAULT_TIMEOUT_S,
                 preprocess: str = "pad"):
        if preprocess not in PREPROCESS_MODES:
            raise InvalidArgument(f"preprocess must be one of {', '.join(PREPROCESS_MODES)}, got {preprocess!r}")
        self.url = server_address(url, protocol)
        self.protocol = protocol
        self.timeout = timeout
        self.preprocess = preprocess
        self._transport = self._open_transport()  # tritonclient/aiohttp are imported here, by protocol

    def _open_transport(self):
        raise NotImplementedError


class Client(_ClientBase):
    """Synchronous client; safe to share between threads (each request has its own stream/connection).

    >>> client = Client("localhost:8001")
    >>> for event in client.stream("Tell a story about this cat", images=["cat.jpg"], force_image=True): ...
    >>> document = client.generate("A short story", seed=1); document.save("out", "html")

    ``url``: HOST:PORT (default localhost and 8001 for grpc, 8000 for http). ``timeout`` (seconds) bounds
    each whole request. ``preprocess``: "pad" (white square, upstream demo) or "crop" (centre crop).
    Generation parameters (keywords of stream/generate): see ``contract.PARAMETERS``.
    """

    def _open_transport(self):
        if self.protocol == "grpc":
            from .transport_grpc import GrpcTransport
            return GrpcTransport(self.url)
        from .transport_http import HttpTransport
        return HttpTransport(self.url)

    def stream(self, prompt: str, images: Images = (), history: History = None, **params) -> Iterator[Event]:
        """Events in arrival order: TextDelta..., ImageStart, ImageEvent, ..., Final.

        ``images``: this turn's images (paths, URLs, bytes, PIL images, arrays; or pre-processed uint8
        [N, 224, 224, 3]), read and pre-processed by this call, so an ImageError is raised right here.
        ``history``: a Conversation (this turn is added to it when the answer completes), or the raw
        `history` list, in which case ``images`` must start with the earlier turns' images.
        """
        request, turn = _prepare(prompt, images, history, params, self.preprocess)
        return _completed(self._transport.stream(request, self.timeout), turn)

    def generate(self, prompt: str, images: Images = (), history: History = None, **params) -> Document:
        """The whole answer as a Document."""
        return Document.from_events(self.stream(prompt, images, history, **params))


class AsyncClient(_ClientBase):
    """asyncio client, same arguments as Client; share one per event loop (it keeps a gRPC channel or
    an HTTP session open) and close it.

    >>> async with AsyncClient("localhost:8001") as client:
    ...     async for event in client.stream("Tell a story", force_image=True): ...
    ...     document = await client.generate("Another one", seed=2)
    """

    def _open_transport(self):
        if self.protocol == "grpc":
            from .transport_grpc import AsyncGrpcTransport
            return AsyncGrpcTransport(self.url)
        from .transport_http import AsyncHttpTransport
        return AsyncHttpTransport(self.url)

    async def stream(self, prompt: str, images: Images = (), history: History = None,
                     **params) -> AsyncIterator[Event]:
        # Reading files and URLs and resizing would block the event loop: do it in a worker thread.
        request, turn = await asyncio.to_thread(_prepare, prompt, images, history, params, self.preprocess)
        async for event in self._transport.stream(request, self.timeout):
            turn.observe(event)
            yield event
        turn.check_complete()

    async def generate(self, prompt: str, images: Images = (), history: History = None, **params) -> Document:
        return Document.from_events([event async for event in self.stream(prompt, images, history, **params)])

    async def close(self) -> None:
        await self._transport.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.close()


def server_address(url: str | None, protocol: str) -> str:
    """``host:port`` from "host", "host:port" or "http://host:port/"; the port defaults by protocol."""
    if protocol not in PROTOCOLS:
        raise InvalidArgument(f"protocol must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")
    scheme, _, rest = (url or "localhost").rpartition("://")
    if scheme not in ("", "http", "grpc"):
        raise InvalidArgument(f"only plain {' and '.join(PROTOCOLS)} are supported (no TLS), got {url!r}")
    address = rest.rstrip("/")
    host, colon, port = address.rpartition(":")
    if not colon or "]" in port:  # no port given (or a bare IPv6 address in brackets)
        return f"{address}:{DEFAULT_PORTS[protocol]}"
    if not port.isdigit() or not host:
        raise InvalidArgument(f"server URL must be HOST:PORT, got {url!r}")
    return address


@dataclass
class _TurnInProgress:
    """Watches one answer: checks that it completes, and then adds the turn to the Conversation, if any."""

    conversation: Conversation | None
    prompt: str
    images: np.ndarray  # this turn's pre-processed images
    events: list = field(default_factory=list)
    complete: bool = False

    def observe(self, event: Event) -> None:
        if self.conversation is not None:
            self.events.append(event)
        if isinstance(event, Final):
            self.complete = True
            if self.conversation is not None:
                self.conversation.add_turn(self.prompt, self.images, Document.from_events(self.events))

    def check_complete(self) -> None:
        if not self.complete:
            raise ServerError("the server ended the answer without its final event")


def _prepare(prompt: str, images: Images, history: History, params: dict,
             preprocess: str) -> tuple[GenerateRequest, _TurnInProgress]:
    pixels = _pixels(images, preprocess)
    if isinstance(history, Conversation):
        turns, all_pixels = history.history(), np.concatenate([history.images(), pixels])
    else:  # raw history: the caller passes the earlier turns' images first in `images`
        turns, all_pixels = list(history or ()), pixels
    request = build_request(prompt, all_pixels, turns, params)
    conversation = history if isinstance(history, Conversation) else None
    return request, _TurnInProgress(conversation, prompt, pixels)


def _pixels(images: Images, preprocess: str) -> np.ndarray:
    if isinstance(images, np.ndarray) and images.ndim == 4:
        if images.dtype != np.uint8 or images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE, 3):
            raise InvalidArgument(f"pre-processed images must be uint8 [N, {IMAGE_SIZE}, {IMAGE_SIZE}, 3], "
                                  f"got {images.dtype} {list(images.shape)}")
        return images
    if isinstance(images, (str, os.PathLike, bytes, bytearray, memoryview, np.ndarray, Image.Image)):
        images = [images]  # one source rather than a sequence of them
    return preprocess_images(images, preprocess)


def _completed(events: Iterator[Event], turn: _TurnInProgress) -> Iterator[Event]:
    for event in events:
        turn.observe(event)
        yield event
    turn.check_complete()
