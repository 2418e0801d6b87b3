"""Exceptions of the client, and how server and transport failures map onto them.

Each exception's ``str()`` is one readable line; ``exit_code`` is what the CLI exits with.
"""

from __future__ import annotations


class MiniGPT5Error(Exception):
    """Base class of every error this package raises on purpose."""

    exit_code = 1

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))  # one line, whatever the server sent


class InvalidArgument(MiniGPT5Error, ValueError):
    """The request was refused as invalid (gRPC INVALID_ARGUMENT, HTTP 400)."""

    exit_code = 2


class ImageError(InvalidArgument):
    """An input image could not be read, or is over a size limit."""


class ServerUnreachable(MiniGPT5Error, ConnectionError):
    """No connection to the server (refused, unknown host, not listening)."""

    exit_code = 3


class Overloaded(MiniGPT5Error):
    """The server is up but refused the request for lack of capacity (gRPC UNAVAILABLE, HTTP 503)."""

    exit_code = 4


class Timeout(MiniGPT5Error, TimeoutError):
    """The request did not finish within its time limit."""

    exit_code = 5


class ServerError(MiniGPT5Error):
    """Any other failure reported by the server, or a malformed answer."""


def from_grpc_status(status: str | None, message: str, url: str, server_listening: bool = True) -> MiniGPT5Error:
    """Exception for a gRPC status such as ``"StatusCode.INVALID_ARGUMENT"`` (as tritonclient names it).

    gRPC uses UNAVAILABLE both for "cannot connect" and for "server busy": ``server_listening``
    (whether the address accepts connections) tells them apart.
    """
    code = (status or "").rsplit(".", 1)[-1]
    if code == "INVALID_ARGUMENT":
        return InvalidArgument(message)
    if code == "DEADLINE_EXCEEDED":
        return Timeout(f"the request to {url} timed out")
    if code == "UNAVAILABLE":
        if not server_listening:
            return ServerUnreachable(f"cannot reach the server at {url} (gRPC): {message}")
        return Overloaded(f"server busy: {message}")
    if code == "NOT_FOUND":
        return ServerError(f"model not available on {url}: {message}")
    return ServerError(f"{code}: {message}" if code else message)


# Triton 2.51's /generate and /generate_stream answer every model error with HTTP 400, UNAVAILABLE
# included (docs/RELIABILITY.md, "Known defects"), so the server's refusals for lack of capacity or
# time are recognised by their text (minigpt5 server: max_inflight_requests, request_timeout_s,
# unloading; Triton: a full queue).
_UNAVAILABLE_MESSAGES = ("server busy", "request_timeout_s", "model is unloading", "maximum queue size")


def from_http_status(status: int, message: str, url: str) -> MiniGPT5Error:
    """Exception for a non-200 answer of the HTTP endpoint."""
    if status == 503 or (status == 400 and any(m in message for m in _UNAVAILABLE_MESSAGES)):
        return Overloaded(message if message.startswith("server busy") else f"server busy: {message}")
    if status == 400:
        return InvalidArgument(message)
    if status == 404:
        return ServerError(f"model not available on {url}: {message}")
    return ServerError(f"HTTP {status}: {message}")
