"""The error every layer raises for bad user input (served as INVALID_ARG, HTTP 400)."""


class InvalidRequest(ValueError):
    """Bad user input; the message names the field and the limit."""
