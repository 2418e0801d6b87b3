"""The Python API: Client (synchronous) and AsyncClient (asyncio), over gRPC (default) or HTTP."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Callable, Generator, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from .connection import Connection
from .conversation import Conversation
from .document import Document
from .errors import InvalidArgument, Overloaded, ServerError
from .events import Event, Final
from .preprocess import IMAGE_SIZE, PREPROCESS_MODES, ImageSource, preprocess_images
from .request import GenerateRequest, build_request

DEFAULT_TIMEOUT_S = 300.0

Images = ImageSource | Iterable[ImageSource]  # one source, several, or pre-processed uint8 [N, 224, 224, 3]
History = Conversation | Sequence[dict] | None


class _ClientBase:
    def __init__(
        self,
        url: str | None = None,
        protocol: str | None = None,
        timeout: float = DEFAULT_TIMEOUT_S,
        preprocess: str = "pad",
        *,
        ca_cert: str | os.PathLike | None = None,
        headers: dict[str, str] | None = None,
        token: str | None = None,
        retries: int = 0,
        retry_backoff_s: float = 0.5,
    ):
        if preprocess not in PREPROCESS_MODES:
            raise InvalidArgument(f"preprocess must be one of {', '.join(PREPROCESS_MODES)}, got {preprocess!r}")
        self.connection = Connection.from_url(
            url,
            protocol,
            ca_cert=ca_cert,
            headers=headers,
            token=token,
            retries=retries,
            retry_backoff_s=retry_backoff_s,
        )
        self.url = self.connection.address
        self.protocol = self.connection.protocol
        self.timeout = timeout
        self.preprocess = preprocess
        self._transport = self._open_transport()  # grpc/aiohttp are imported here, by protocol

    def _open_transport(self):
        raise NotImplementedError


class Client(_ClientBase):
    """Synchronous client; safe to share between threads (one gRPC channel, one call per request).

    >>> with Client("localhost:8001") as client:
    ...     for event in client.stream("Tell a story about this cat", images=["cat.jpg"], force_image=True): ...
    ...     document = client.generate("A short story", seed=1); document.save("out", "html")

    ``url``: HOST:PORT (default localhost and 8001 for grpc, 8000 for http), or with a scheme: grpc://,
    grpcs:// (TLS), http://, https:// (the scheme sets the protocol). ``ca_cert``: the PEM file of the
    CA that signed the server's certificate (default: the system's). ``headers``: sent with every
    request; ``token`` (default $MINIGPT5_TOKEN) as ``authorization: Bearer``. ``retries``: how many
    more times a request refused as Overloaded is sent, after ``retry_backoff_s`` doubled each time,
    with jitter; only before its first event (a started answer is never sent again). ``timeout``
    (seconds) bounds each attempt. ``preprocess``: "pad" (white square, upstream demo) or "crop".
    Generation parameters (keywords of stream/generate): see ``contract.PARAMETERS``.
    """

    def _open_transport(self):
        if self.protocol == "grpc":
            from .transport_grpc import GrpcTransport

            return GrpcTransport(self.connection)
        from .transport_http import HttpTransport

        return HttpTransport(self.connection)

    def stream(self, prompt: str, images: Images = (), history: History = None, **params) -> Iterator[Event]:
        """Events in arrival order: TextDelta..., ImageStart, ImageEvent, ..., Final.

        ``images``: this turn's images (paths, URLs, bytes, PIL images, arrays; or pre-processed uint8
        [N, 224, 224, 3]), read and pre-processed by this call, so an ImageError is raised right here.
        ``history``: a Conversation (this turn is added to it when the answer completes), or the raw
        `history` list, in which case ``images`` must start with the earlier turns' images.
        """
        request, turn = _prepare(prompt, images, history, params, self.preprocess)
        events = _with_retries(lambda: self._transport.stream(request, self.timeout), self.connection)
        return _completed(events, turn)

    def generate(self, prompt: str, images: Images = (), history: History = None, **params) -> Document:
        """The whole answer as a Document."""
        return Document.from_events(self.stream(prompt, images, history, **params))

    def close(self) -> None:
        """Close the channel (gRPC); requests after this fail."""
        close = getattr(self._transport, "close", None)
        if close is not None:
            close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


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

            return AsyncGrpcTransport(self.connection)
        from .transport_http import AsyncHttpTransport

        return AsyncHttpTransport(self.connection)

    async def stream(self, prompt: str, images: Images = (), history: History = None, **params) -> AsyncIterator[Event]:
        # Reading files and URLs and resizing would block the event loop: do it in a worker thread.
        request, turn = await asyncio.to_thread(_prepare, prompt, images, history, params, self.preprocess)
        async for event in _with_retries_async(lambda: self._transport.stream(request, self.timeout), self.connection):
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


def server_address(url: str | None, protocol: str | None = None) -> str:
    """``host:port`` of a server URL (see Client); the port defaults by protocol."""
    return Connection.from_url(url, protocol).address


def _with_retries(open_stream: Callable[[], Generator[Event, None, None]], connection: Connection) -> Iterator[Event]:
    """The events of one request, sent again (up to `connection.retries` more times, after a jittered
    backoff) while it is refused as Overloaded before its first event."""
    for attempt in range(connection.retries + 1):
        events = open_stream()
        try:
            first = next(events)
        except StopIteration:
            return
        except Overloaded:
            if attempt == connection.retries:
                raise
            time.sleep(connection.retry_delay(attempt))
            continue
        try:
            yield first
            yield from events
        finally:
            events.close()  # an answer abandoned early is cancelled now, not when collected
        return


async def _with_retries_async(open_stream, connection: Connection) -> AsyncIterator[Event]:
    for attempt in range(connection.retries + 1):
        events = open_stream()
        try:
            first = await events.__anext__()
        except StopAsyncIteration:
            return
        except Overloaded:
            if attempt == connection.retries:
                raise
            await asyncio.sleep(connection.retry_delay(attempt))
            continue
        try:
            yield first
            async for event in events:
                yield event
        finally:
            await events.aclose()
        return


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


def _prepare(
    prompt: str, images: Images, history: History, params: dict, preprocess: str
) -> tuple[GenerateRequest, _TurnInProgress]:
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
            raise InvalidArgument(
                f"pre-processed images must be uint8 [N, {IMAGE_SIZE}, {IMAGE_SIZE}, 3], "
                f"got {images.dtype} {list(images.shape)}"
            )
        return images
    if isinstance(images, (str, os.PathLike, bytes, bytearray, memoryview, np.ndarray, Image.Image)):
        images = [images]  # one source rather than a sequence of them
    return preprocess_images(images, preprocess)


def _completed(events: Iterator[Event], turn: _TurnInProgress) -> Iterator[Event]:
    for event in events:
        turn.observe(event)
        yield event
    turn.check_complete()
