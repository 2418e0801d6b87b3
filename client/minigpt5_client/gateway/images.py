"""Images in (data: URLs, allowed http(s) URLs) -> pre-processed pixels; images out -> data: URLs."""

from __future__ import annotations

import asyncio
import base64

import httpx
import numpy as np

from ..errors import ImageError
from ..preprocess import IMAGE_SIZE, MAX_IMAGE_FILE_BYTES, URL_TIMEOUT_S, preprocess_image
from .errors import bad_request
from .messages import ImageRef


def png_data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


async def load_pixels(refs: list[ImageRef], mode: str, http: httpx.AsyncClient | None) -> np.ndarray:
    """uint8 [N, 224, 224, 3] in order. URLs are fetched here (no redirects, size-capped); decoding
    and resizing run in a worker thread so that the event loop keeps serving other streams."""
    if not refs:
        return np.zeros((0, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    sources = [ref.data if ref.data is not None else await _fetch(ref, http) for ref in refs]
    return await asyncio.to_thread(_preprocess_all, refs, sources, mode)


def _preprocess_all(refs: list[ImageRef], sources: list[bytes], mode: str) -> np.ndarray:
    arrays = []
    for ref, source in zip(refs, sources, strict=True):
        try:
            arrays.append(preprocess_image(source, mode))
        except ImageError as error:
            raise bad_request(ref.field, str(error)) from None
    return np.stack(arrays)


async def _fetch(ref: ImageRef, http: httpx.AsyncClient | None) -> bytes:
    """GET an allowed image URL. Redirects are not followed: they could lead to a host nobody allowed."""
    assert http is not None, "an image URL passed the allow-list but the gateway has no HTTP client"
    assert ref.url is not None, "_fetch is only called for images given by URL"
    try:
        async with http.stream("GET", ref.url, timeout=URL_TIMEOUT_S, follow_redirects=False) as reply:
            if reply.status_code != 200:
                raise bad_request(
                    ref.field, f"fetching {ref.url} gave HTTP {reply.status_code} (redirects are not followed)"
                )
            data = bytearray()
            async for chunk in reply.aiter_bytes():
                data += chunk
                if len(data) > MAX_IMAGE_FILE_BYTES:
                    raise bad_request(ref.field, f"{ref.url} is over the {MAX_IMAGE_FILE_BYTES // 2**20} MiB limit")
            return bytes(data)
    except httpx.HTTPError as error:
        raise bad_request(ref.field, f"cannot fetch {ref.url}: {error or type(error).__name__}") from None
