"""Exceptions of the client, and how server and transport failures map onto them.

Each exception's ``str()`` is one readable line; ``exit_code`` is what the CLI exits with.
"""

from __future__ import annotations

import re


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
    """Exception for a gRPC status such as ``"StatusCode.INVALID_ARGUMENT"`` (as tritonclient names it),
    or for an in-band stream error (``status`` None).

    gRPC uses UNAVAILABLE both for "cannot connect" and for "server busy": ``server_listening``
    (whether the address accepts connections) tells them apart.
    """
    if status is None:  # an in-band stream error: a message only
        return from_server_message(message)
    code = status.rsplit(".", 1)[-1]
    if code == "INVALID_ARGUMENT":
        return InvalidArgument(message)
    if code == "DEADLINE_EXCEEDED":
        return Timeout(f"the request to {url} timed out")
    if code == "UNAVAILABLE":
        if "protocol is restricted" in message:  # Triton's --grpc-restricted-protocol: a header is missing
            return ServerError(f"refused by {url}: {message}")
        if not server_listening:
            return ServerUnreachable(f"cannot reach the server at {url} (gRPC): {message}")
        return Overloaded(f"server busy: {message}")
    if code == "NOT_FOUND":
        return ServerError(f"model not available on {url}: {message}")
    return ServerError(f"{code}: {message}" if code else message)


# Errors that come without a usable status are told apart by their text: Triton 2.51's /generate and
# /generate_stream answer every model error with HTTP 400 (docs/RELIABILITY.md, "Known defects"), and
# gRPC stream errors come in-band, as a message (the client does not ask for Triton's
# `triton_grpc_error` mode, whose stream teardown can crash Triton 2.51's gRPC frontend).
# Refusals for lack of capacity or time (server: max_inflight_requests, request_timeout_s,
# unloading; Triton: a full queue):
_UNAVAILABLE_MESSAGES = ("server busy", "request_timeout_s", "model is unloading", "maximum queue size")
# Invalid requests: the server's own refusals name the input first (`max_tokens: must be ...`,
# `image_bytes[0]: ...`) or the decoder's limits; Triton's name the input in its own words.
_INPUT_FIELD = re.compile(
    r"^(text_input|images|image_bytes|image_preprocess|history|max_tokens|stream|temperature|"
    r"top_p|top_k|repetition_penalty|random_seed|force_image|force_image_mode|max_images|"
    r"guidance_scale|num_inference_steps|scheduler)(\[\d+\])?: "
)
_INVALID_MESSAGES = (
    "kv_cache_budget_tokens",
    "exceeds the context",
    "inference input",
    "unexpected shape",
    "expected number of inputs",
    "data-type",
    "can not convert input",
    "failed to parse",
)


def from_server_message(message: str) -> MiniGPT5Error:
    """Exception for a server error known only by its message: a refusal for capacity or time, an
    invalid request, or else a server failure."""
    if any(marker in message for marker in _UNAVAILABLE_MESSAGES):
        return Overloaded(message if message.startswith("server busy") else f"server busy: {message}")
    if _INPUT_FIELD.match(message) or any(marker in message for marker in _INVALID_MESSAGES):
        return InvalidArgument(message)
    return ServerError(message)


def from_http_status(status: int, message: str, url: str) -> MiniGPT5Error:
    """Exception for a non-200 answer of the HTTP endpoint."""
    if status == 503:
        return Overloaded(f"server busy: {message}")
    if status == 400:  # any model error in Triton 2.51, whatever its code
        return from_server_message(message)
    if status == 404:
        return ServerError(f"model not available on {url}: {message}")
    return ServerError(f"HTTP {status}: {message}")
