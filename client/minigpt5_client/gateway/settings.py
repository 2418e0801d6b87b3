"""What a gateway is configured with (command-line flags, environment, files): one frozen dataclass."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from .handoff_config import HandoffConfig

API_KEYS_ENV = "MINIGPT5_GATEWAY_API_KEYS"  # comma-separated
DEFAULT_MODEL_NAME = "minigpt5"
DEFAULT_MAX_BODY_BYTES = 64 * 2**20  # 8 images of up to 20 MiB would need more: see docs/GATEWAY.md
DEFAULT_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class GatewaySettings:
    triton_url: str  # gRPC HOST:PORT of the server serving `minigpt5`
    api_keys: frozenset[str] = frozenset()  # empty: open to anyone who can reach it
    model_name: str = DEFAULT_MODEL_NAME  # the name /v1/models lists and requests give as `model`
    timeout_s: float = DEFAULT_TIMEOUT_S  # bounds each Triton request (504 past it)
    cors_origins: tuple[str, ...] = ()
    image_hosts: tuple[str, ...] = ()  # hosts whose http(s) image URLs are fetched; none: data: URLs only
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    inline_images: bool = False  # default of the request field `inline_images` (Markdown images in the text)
    preprocess: str = "pad"  # default of the request field `image_preprocess`
    handoff: HandoffConfig = field(default_factory=HandoffConfig)


def load_api_keys(key_file: Path | None = None, environ: Mapping[str, str] | None = None) -> frozenset[str]:
    """Keys from $MINIGPT5_GATEWAY_API_KEYS (comma-separated) and from a file (one per line, `#` comments)."""
    env = os.environ if environ is None else environ
    keys = {key.strip() for key in env.get(API_KEYS_ENV, "").split(",")}
    if key_file is not None:
        lines = Path(key_file).read_text(encoding="utf-8").splitlines()
        keys.update(line.strip() for line in lines if not line.lstrip().startswith("#"))
    return frozenset(key for key in keys if key)
