"""`minigpt5`'s image-embedding cache on its own: keys, LRU eviction within its bytes, each distinct
image encoded once."""

from __future__ import annotations

import numpy as np

from minigpt5.serving.embedding_cache import EmbeddingCache

ENTRY_BYTES = 32 * 8 * 4  # float32 [32, 8]


def _pictures(count: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(count, 224, 224, 3), dtype=np.uint8)


class Encoder:
    """A stand-in vision encoder: embeddings from the pixels' mean, and a record of every call."""

    def __init__(self):
        self.calls: list[int] = []

    def __call__(self, images: np.ndarray) -> np.ndarray:
        self.calls.append(len(images))
        return np.stack([np.full((32, 8), image.mean(), dtype=np.float32) for image in images])


def test_hits_skip_the_encoder_and_each_distinct_image_is_encoded_once():
    cache, encoder = EmbeddingCache(10 * ENTRY_BYTES, "weights-a"), Encoder()
    a, b = _pictures(2)
    first, encoded = cache.encode(np.stack([a, b, a]), encoder)
    assert encoder.calls == [2] and encoded == 2  # `a` twice in one request: encoded once
    assert first[0] is first[2] and first[0].key != first[1].key
    again, encoded = cache.encode(np.stack([b, a]), encoder)
    assert encoder.calls == [2] and encoded == 0
    assert [e.key for e in again] == [first[1].key, first[0].key]
    np.testing.assert_array_equal(again[1].embeds, encoder(a[None])[0])
    assert (cache.hits, cache.misses, cache.entries, cache.nbytes) == (3, 2, 2, 2 * ENTRY_BYTES)


def test_the_least_recently_used_image_is_evicted_beyond_the_size():
    cache, encoder = EmbeddingCache(2 * ENTRY_BYTES, "weights-a"), Encoder()
    a, b, c = _pictures(3)
    cache.encode(a[None], encoder)
    cache.encode(b[None], encoder)
    cache.encode(a[None], encoder)  # a used last: b is the least recently used
    cache.encode(c[None], encoder)
    assert cache.entries == 2 and cache.nbytes == 2 * ENTRY_BYTES
    calls = len(encoder.calls)
    cache.encode(a[None], encoder)
    assert len(encoder.calls) == calls  # a kept
    cache.encode(b[None], encoder)
    assert len(encoder.calls) == calls + 1  # b was evicted


def test_other_pixels_or_weights_never_match_and_zero_bytes_keeps_nothing():
    a = _pictures(1)[0]
    cropped = a.copy()
    cropped[0, 0, 0] ^= 1  # one pixel differs (another pre-processing of the same file)
    cache = EmbeddingCache(10 * ENTRY_BYTES, "weights-a")
    assert cache.pixel_key(a) != cache.pixel_key(cropped)
    assert cache.pixel_key(a) != EmbeddingCache(10 * ENTRY_BYTES, "weights-b").pixel_key(a)
    off, encoder = EmbeddingCache(0, "weights-a"), Encoder()
    off.encode(a[None], encoder)
    off.encode(a[None], encoder)
    assert encoder.calls == [1, 1] and off.entries == 0
