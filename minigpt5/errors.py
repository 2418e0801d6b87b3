"""The errors every layer raises for what the client should see: bad input or a busy server."""


class InvalidRequest(ValueError):
    """Bad user input (INVALID_ARG, HTTP 400); the message names the field and the limit."""


class Overloaded(RuntimeError):
    """Served as UNAVAILABLE (HTTP 503): the client should retry later or elsewhere."""
