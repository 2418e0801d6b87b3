"""Where the server is and how to reach it: protocol, host:port, TLS and its CA, extra headers, retries."""

from __future__ import annotations

import os
import random
from dataclasses import dataclass, field

from .errors import InvalidArgument

PROTOCOLS = ("grpc", "http")
DEFAULT_PORTS = {"grpc": 8001, "http": 8000}
# URL scheme -> (protocol, TLS)
SCHEMES = {"grpc": ("grpc", False), "grpcs": ("grpc", True), "http": ("http", False), "https": ("http", True)}
TOKEN_ENV = "MINIGPT5_TOKEN"  # a bearer token for the Authorization header, when none is given


@dataclass(frozen=True)
class Connection:
    """How a client reaches the server. Build it with `Connection.from_url`."""

    address: str  # host:port
    protocol: str = "grpc"
    tls: bool = False
    ca_cert: str | None = None  # PEM file of the CA that signed the server's certificate (default: system CAs)
    headers: dict[str, str] = field(default_factory=dict)  # sent with every request (gRPC metadata or HTTP)
    retries: int = 0  # extra attempts of a request refused as Overloaded before its first event
    retry_backoff_s: float = 0.5  # the first wait; doubled per attempt, with jitter

    @classmethod
    def from_url(
        cls,
        url: str | None,
        protocol: str | None = None,
        *,
        ca_cert: str | os.PathLike | None = None,
        headers: dict[str, str] | None = None,
        token: str | None = None,
        retries: int = 0,
        retry_backoff_s: float = 0.5,
    ) -> Connection:
        """``url``: "host", "host:port", or with a scheme: grpc://, grpcs:// (gRPC over TLS), http://,
        https://. The scheme sets the protocol; without one, ``protocol`` does (default grpc). ``token``
        (default $MINIGPT5_TOKEN) goes out as ``authorization: Bearer <token>``."""
        scheme, _, rest = (url or "localhost").rpartition("://")
        if scheme and scheme not in SCHEMES:
            raise InvalidArgument(f"server URL scheme must be one of {', '.join(SCHEMES)}, got {url!r}")
        scheme_protocol, tls = SCHEMES.get(scheme, (None, False))
        if protocol is not None and protocol not in PROTOCOLS:
            raise InvalidArgument(f"protocol must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")
        if protocol and scheme_protocol and protocol != scheme_protocol:
            raise InvalidArgument(f"protocol={protocol!r} contradicts the URL {url!r}")
        protocol = scheme_protocol or protocol or "grpc"
        if retries < 0 or retry_backoff_s < 0:
            raise InvalidArgument(f"retries and retry_backoff_s must be >= 0, got {retries}, {retry_backoff_s}")
        if ca_cert is not None and not os.path.isfile(ca_cert):
            raise InvalidArgument(f"ca_cert: no such file {os.fspath(ca_cert)!r}")
        all_headers = {name.lower(): value for name, value in (headers or {}).items()}
        token = token or os.environ.get(TOKEN_ENV)
        if token:
            all_headers["authorization"] = f"Bearer {token}"
        for name, value in all_headers.items():
            if not name or any(c in name + value for c in "\r\n"):
                raise InvalidArgument(f"header {name!r}: names must be non-empty, values on one line")
        return cls(
            _address(rest, protocol, url),
            protocol,
            tls,
            os.fspath(ca_cert) if ca_cert else None,
            all_headers,
            retries,
            retry_backoff_s,
        )

    @property
    def url(self) -> str:
        """The address with its scheme, for messages."""
        scheme = {("grpc", False): "grpc", ("grpc", True): "grpcs", ("http", False): "http", ("http", True): "https"}[
            self.protocol, self.tls
        ]
        return f"{scheme}://{self.address}"

    def ca_pem(self) -> bytes | None:
        if self.ca_cert is None:
            return None
        with open(self.ca_cert, "rb") as file:
            return file.read()

    def retry_delay(self, attempt: int) -> float:
        """Seconds to wait before attempt ``attempt`` + 1: exponential, with "full jitter" between 50 %
        and 100 % so that refused clients do not come back all at once."""
        return self.retry_backoff_s * (2**attempt) * random.uniform(0.5, 1.0)


def _address(rest: str, protocol: str, url: str | None) -> str:
    """``host:port`` from "host", "host:port" or "host:port/"; the port defaults by protocol."""
    address = rest.rstrip("/")
    host, colon, port = address.rpartition(":")
    if not colon or "]" in port:  # no port given (or a bare IPv6 address in brackets)
        return f"{address}:{DEFAULT_PORTS[protocol]}"
    if not port.isdigit() or not host:
        raise InvalidArgument(f"server URL must be HOST:PORT, got {url!r}")
    return address
