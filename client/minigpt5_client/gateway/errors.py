"""Errors in OpenAI's shape (``{"error": {"message", "type", "param", "code"}}``) with real HTTP statuses.

The thin client already tells Triton's errors apart (``minigpt5_client.errors``); this module only
maps its exceptions onto statuses, so the gateway answers 400, 503 and 504 where Triton 2.51's
HTTP endpoints answer 400 for everything.
"""

from __future__ import annotations

import re

from ..errors import InvalidArgument, MiniGPT5Error, Overloaded, ServerUnreachable, Timeout

RETRY_AFTER_S = 1  # what a refusal for lack of capacity tells clients to wait before retrying

# The model's input names, as its refusals start (`max_tokens: must be in [1, 1024], got 0`), and the
# request field a client of this API knows them by.
_INPUT_PARAMS = {
    "text_input": "messages",
    "images": "messages",
    "image_bytes": "messages",
    "history": "messages",
    "random_seed": "seed",
}
_INPUT_NAME = re.compile(r"^([a-z_]+)(\[\d+\])?: ")


class GatewayError(Exception):
    """An answer other than 200, in OpenAI's error shape."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        type: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or _TYPES.get(status, "server_error")
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    404: "invalid_request_error",
    413: "invalid_request_error",
    502: "server_error",
    503: "server_error",
    504: "timeout",
}


def bad_request(param: str, message: str) -> GatewayError:
    """400 for one field: the message starts with the field's name, as the server's own refusals do."""
    return GatewayError(400, f"{param}: {message}", param=param, code="invalid_value")


def from_client_error(error: MiniGPT5Error) -> GatewayError:
    """The status and shape for an exception of the thin client (a Triton refusal or a transport failure)."""
    message = str(error)
    if isinstance(error, InvalidArgument):
        name = _INPUT_NAME.match(message)
        param = _INPUT_PARAMS.get(name.group(1), name.group(1)) if name else None
        return GatewayError(400, message, param=param, code="invalid_value")
    if isinstance(error, Timeout) or (isinstance(error, Overloaded) and "request_timeout_s" in message):
        return GatewayError(504, message, code="timeout")
    if isinstance(error, Overloaded):
        return GatewayError(503, message, code="server_busy", headers={"Retry-After": str(RETRY_AFTER_S)})
    if isinstance(error, ServerUnreachable):
        return GatewayError(503, message, code="backend_unreachable", headers={"Retry-After": str(RETRY_AFTER_S)})
    return GatewayError(502, message, code="backend_error")
