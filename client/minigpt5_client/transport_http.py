"""HTTP streaming: POST /v2/models/minigpt5/generate_stream, answered with Server-Sent Events.

Triton writes each response as ``data: {json}`` and a blank line. An error before the first response
comes with its status code (400 invalid argument, 503 overload); a later one is a ``data:`` payload
with an ``error`` key. Image events are single lines of several hundred kB (base64 PNG), so lines are
split here rather than with line readers that cap line length.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import ssl
import time
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING

from .connection import Connection
from .contract import MODEL_NAME
from .errors import MiniGPT5Error, ServerError, ServerUnreachable, Timeout, from_http_status, from_server_message
from .events import Event, events_from_outputs
from .request import GenerateRequest

if TYPE_CHECKING:
    import aiohttp

GENERATE_STREAM_PATH = f"/v2/models/{MODEL_NAME}/generate_stream"
_HEADERS = {"Content-Type": "application/json", "Accept": "text/event-stream"}
_READ_SIZE = 1 << 16


class HttpTransport:
    """Synchronous, over http.client: one connection per request (Triton answers an SSE stream with
    "Connection: close")."""

    def __init__(self, connection: Connection):
        self.connection = connection
        self.url = connection.url
        self.host, _, port = connection.address.rpartition(":")
        self.port = int(port)
        self._tls = _tls_context(connection) if connection.tls else None
        self._headers = {**_HEADERS, **connection.headers}

    def stream(self, request: GenerateRequest, timeout: float) -> Iterator[Event]:
        body = json.dumps(request.json_body()).encode("utf-8")
        deadline = time.monotonic() + timeout
        connection = (
            http.client.HTTPSConnection(self.host, self.port, timeout=timeout, context=self._tls)
            if self._tls
            else http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        )
        try:
            connection.connect()
            sock = connection.sock  # the connection lets go of it when the server says "Connection: close"
        except TimeoutError:
            raise Timeout(f"connecting to {self.url} timed out after {timeout:g} s") from None
        except ssl.SSLError as error:
            raise ServerUnreachable(f"TLS with {self.url} failed: {error}") from None
        except OSError as error:
            raise ServerUnreachable(f"cannot reach the server at {self.url} (HTTP): {error}") from None
        try:
            connection.request("POST", GENERATE_STREAM_PATH, body, self._headers)
            response = connection.getresponse()
            if response.status != 200:
                raise from_http_status(response.status, _error_message(response.read()), self.url)
            decoder = SseDecoder()
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise Timeout(f"the request to {self.url} timed out after {timeout:g} s")
                sock.settimeout(remaining)
                chunk = response.read1(_READ_SIZE)
                if not chunk:
                    return
                for payload in decoder.feed(chunk):
                    yield from _events(payload)
        except MiniGPT5Error:
            raise
        except TimeoutError:  # socket.timeout
            raise Timeout(f"the request to {self.url} timed out after {timeout:g} s") from None
        except (http.client.HTTPException, OSError) as error:
            raise ServerError(f"HTTP connection to {self.url} failed: {error}") from None
        finally:
            connection.close()


class AsyncHttpTransport:
    """asyncio, over aiohttp (already a dependency of tritonclient[http]): one session for the client's lifetime."""

    def __init__(self, connection: Connection):
        self.connection = connection
        self.url = connection.url
        self._session: aiohttp.ClientSession | None = None

    async def stream(self, request: GenerateRequest, timeout: float) -> AsyncIterator[Event]:
        import aiohttp  # only asyncio HTTP users pay for importing it

        if self._session is None:
            self._session = aiohttp.ClientSession()
        try:
            async with self._session.post(
                f"{self.url}{GENERATE_STREAM_PATH}",
                json=request.json_body(),
                headers={"Accept": "text/event-stream", **self.connection.headers},
                timeout=aiohttp.ClientTimeout(total=timeout),
                ssl=_tls_context(self.connection) if self.connection.tls else None,
            ) as response:
                if response.status != 200:
                    raise from_http_status(response.status, _error_message(await response.read()), self.url)
                decoder = SseDecoder()
                async for chunk in response.content.iter_any():
                    for payload in decoder.feed(chunk):
                        for event in _events(payload):
                            yield event
        except MiniGPT5Error:
            raise
        except asyncio.TimeoutError:
            raise Timeout(f"the request to {self.url} timed out after {timeout:g} s") from None
        except aiohttp.ClientConnectorError as error:
            raise ServerUnreachable(f"cannot reach the server at {self.url} (HTTP): {error.os_error}") from None
        except aiohttp.ClientError as error:
            raise ServerError(f"HTTP connection to {self.url} failed: {error}") from None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


class SseDecoder:
    """Turns a byte stream of Server-Sent Events into the ``data`` of each complete event."""

    def __init__(self) -> None:
        self._buffer = b""
        self._data_lines: list[str] = []

    def feed(self, chunk: bytes) -> list[str]:
        self._buffer += chunk
        *lines, self._buffer = self._buffer.split(b"\n")
        payloads = []
        for raw_line in lines:
            line = raw_line.rstrip(b"\r").decode("utf-8", "replace")
            if not line:  # a blank line ends an event
                if self._data_lines:
                    payloads.append("\n".join(self._data_lines))
                    self._data_lines = []
            elif line.startswith("data:"):
                self._data_lines.append(line[5:].removeprefix(" "))
            # other fields (event:, id:, retry:) and comments (":...") carry nothing for us
        return payloads


def _events(payload: str) -> list[Event]:
    try:
        message = json.loads(payload)
    except ValueError:
        raise ServerError(f"malformed event from the server: {payload[:200]!r}") from None
    if "error" in message:  # after the first event: classified by its text, as before it
        raise from_server_message(str(message["error"]))

    def output(name: str) -> list:
        value = message.get(name)
        if value is None:
            return []
        return value if isinstance(value, list) else [value]  # Triton unwraps one-element outputs

    return events_from_outputs(output)


def _tls_context(connection: Connection) -> ssl.SSLContext:
    """Verifies the server's certificate against `ca_cert`, else the system's CAs."""
    return ssl.create_default_context(cafile=connection.ca_cert)


def _error_message(body: bytes) -> str:
    """The text of Triton's error body: ``{"error": ...}``, possibly as an SSE ``data:`` line."""
    text = body.decode("utf-8", "replace").strip()
    try:
        message = json.loads(text.removeprefix("data:").strip())
    except ValueError:
        return text or "(no message)"
    return str(message.get("error", text)) if isinstance(message, dict) else text
