"""Image-embedding cache of `minigpt5`: encoded images by a hash of their pre-processed pixels.

Why here, before the BLS call, rather than in `vision_encoder`: a hit then costs neither the
vision forward nor the round trip (the pixels, 150 KB an image, copied into the child's shared
memory and the embeddings copied back), and `minigpt5` is where a chat's earlier images arrive
again with every turn. The key is the pixels the encoder would see, so the pre-processing mode is
part of it (a `pad` and a `crop` of one file differ in their pixels) while the same pixels reached
either way (a square image, or pre-processed by the client) share one entry; the vision weights'
identity is part of it too. Each entry also keeps its embeddings' content key, which the decoder's
prefix cache uses to name the image's positions, so it is hashed once per distinct image.

Triton-free (minigpt5_model.py calls `encode(images, encoder)` with its BLS call) and thread-safe.
"""

from __future__ import annotations

import collections
import hashlib
import threading
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..prefix_cache import tensor_key
from ..weights.layout import MANIFEST, component_file


@dataclass
class CachedEmbedding:
    embeds: np.ndarray  # float32 [32, H]
    key: str  # tensor_key(embeds): names the image's positions in the decoder's prefix cache


class EmbeddingCache:
    """LRU of image embeddings within `max_bytes`; 0 keeps nothing (every image is encoded)."""

    def __init__(self, max_bytes: int, weights_key: str):
        if max_bytes < 0:
            raise ValueError(f"image_embedding_cache_mb: must be >= 0, got {max_bytes}")
        self.max_bytes = max_bytes
        self._weights_key = weights_key.encode()
        self._entries: collections.OrderedDict[str, CachedEmbedding] = collections.OrderedDict()
        self._lock = threading.Lock()
        self.nbytes = 0
        self.hits = self.misses = 0

    @property
    def entries(self) -> int:
        return len(self._entries)

    def pixel_key(self, image: np.ndarray) -> str:
        digest = hashlib.blake2b(self._weights_key + str(image.shape).encode(), digest_size=16)
        digest.update(np.ascontiguousarray(image, dtype=np.uint8).data)
        return digest.hexdigest()

    def encode(
        self, images: np.ndarray, encoder: Callable[[np.ndarray], np.ndarray]
    ) -> tuple[list[CachedEmbedding], int]:
        """Embeddings of uint8 [N, 224, 224, 3] images: cached ones from here, the others (each
        distinct image once) from `encoder` in one call, then kept. Also returns how many images
        `encoder` was given."""
        keys = [self.pixel_key(image) for image in images]
        with self._lock:
            cached = {key: self._get(key) for key in keys}
        found = {key: entry for key, entry in cached.items() if entry is not None}
        missing = [key for key, entry in cached.items() if entry is None]
        if missing:
            first = {key: keys.index(key) for key in missing}
            embeds = encoder(np.stack([images[first[key]] for key in missing]))
            computed = {key: CachedEmbedding(np.asarray(e, dtype=np.float32), "") for key, e in zip(missing, embeds)}
            for entry in computed.values():
                entry.key = tensor_key(entry.embeds)
            found.update(computed)
        with self._lock:
            self.hits += len(keys) - len(missing)
            self.misses += len(missing)
            for key in missing:
                self._put(key, found[key])
        return [found[key] for key in keys], len(missing)

    def _get(self, key: str) -> CachedEmbedding | None:
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
        return entry

    def _put(self, key: str, entry: CachedEmbedding) -> None:
        if key in self._entries or entry.embeds.nbytes > self.max_bytes:
            return
        while self.nbytes + entry.embeds.nbytes > self.max_bytes:
            _, evicted = self._entries.popitem(last=False)
            self.nbytes -= evicted.embeds.nbytes
        self._entries[key] = entry
        self.nbytes += entry.embeds.nbytes


def weights_key(weights) -> str:
    """Identity of the vision weights `vision_encoder` loads: the manifest and the vision file's size and
    modification time (reading the file itself would cost seconds for ViT-g)."""
    vision = weights.path / component_file("vision")
    stat = vision.stat()
    manifest = (weights.path / MANIFEST).read_bytes()
    return hashlib.blake2b(
        manifest + f"{vision.resolve()}{stat.st_size}{stat.st_mtime_ns}".encode(), digest_size=16
    ).hexdigest()
