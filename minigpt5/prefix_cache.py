"""Prefix cache: the KV of prompt blocks kept after a prefill and copied into later requests' slots.

A prompt is cut into blocks of `block_positions` positions. Each full block is named by a chain hash:
the hash of its parent block's hash and its own content, where a text position is its token id and
an image position is (the image's content key, its index among the 32 embeddings), and the root
is the model's weights fingerprint. Equal hashes mean equal positions *and* an equal prefix before
them under the same weights, so their keys and values are equal: a block can be reused by any
prompt that starts with the same chain (the shared system prompt, the earlier turns of a chat).

The engine (engine.py) looks up the longest cached chain of a new request, copies those blocks into
the request's own KV slot and prefills only the rest; the blocks it computed go into the cache.
Rows own copies, never references, so nothing in the cache is ever in use: any block can be evicted
at any time (LRU), aborts and failed steps cannot leave it inconsistent, and a request never waits
for it. Blocks are touched leaf first, so a chain's root is the most recent of the chain and LRU
evicts a chain from its end: no block outlives its parent for long.
"""

from __future__ import annotations

import collections
import hashlib
from collections.abc import Collection
from dataclasses import dataclass

import torch

from .config import NUM_QUERY_TOKENS

FINGERPRINT_SAMPLES = 1024  # values read from each weight tensor for the weights fingerprint


@dataclass
class CachedBlock:
    keys: torch.Tensor  # [layers, KV heads, block positions, head dim]
    values: torch.Tensor

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes


@dataclass
class CacheStats:
    hits: int = 0  # blocks found and reused
    misses: int = 0  # full prompt blocks that had to be computed
    evicted: int = 0  # blocks evicted


class PrefixCache:
    """Blocks of prompt KV keyed by chain hash, least recently used first, at most `max_positions`."""

    def __init__(self, block_positions: int = 16, max_positions: int = 8192):
        if block_positions < 1 or max_positions < 0:
            raise ValueError("prefix cache: block_positions must be >= 1 and max_positions >= 0")
        self.block_positions = block_positions
        self.max_positions = max_positions
        self._blocks: collections.OrderedDict[bytes, CachedBlock] = collections.OrderedDict()
        self.stats = CacheStats()
        self.nbytes = 0

    @property
    def blocks(self) -> int:
        return len(self._blocks)

    @property
    def positions(self) -> int:
        return len(self._blocks) * self.block_positions

    def chain(self, model_key: str, content: list) -> list[bytes]:
        """Chain hashes of the full blocks of `content` (one item per position, see position_content)."""
        size, parent, hashes = self.block_positions, model_key.encode(), []
        for start in range(0, len(content) - size + 1, size):
            parent = hashlib.blake2b(parent + repr(content[start : start + size]).encode(), digest_size=16).digest()
            hashes.append(parent)
        return hashes

    def match(self, hashes: list[bytes], limit: int) -> list[CachedBlock]:
        """The cached blocks of the longest cached prefix of `hashes`, at most `limit` blocks; touched."""
        found = []
        for block_hash in hashes[:limit]:
            block = self._blocks.get(block_hash)
            if block is None:
                break
            found.append(block)
        self._touch(hashes[: len(found)])
        return found

    def insert(self, chain: list[bytes], first: int, blocks: list[CachedBlock], room: int) -> int:
        """Add `blocks`, the blocks `first`.. of `chain`, keeping the cache within `room` positions (and
        its own limit) by evicting the least recently used blocks of other chains; returns how many
        were added."""
        room = min(room, self.max_positions)
        added = 0
        for block_hash, block in zip(chain[first:], blocks):
            if block_hash in self._blocks:
                continue
            if not self.evict_to(room - self.block_positions, keep=chain):
                break  # a chain is only useful from its root: stop at the first block that does not fit
            self._blocks[block_hash] = block
            self.nbytes += block.nbytes
            added += 1
        self._touch(chain)
        return added

    def evict_to(self, positions: int, keep: Collection[bytes] = ()) -> bool:
        """Evict least recently used blocks (not those in `keep`) until at most `positions` are held.
        False if that is impossible without evicting a kept block."""
        keep = set(keep)
        for block_hash in [h for h in self._blocks if h not in keep]:
            if self.positions <= positions:
                break
            self.nbytes -= self._blocks.pop(block_hash).nbytes
            self.stats.evicted += 1
        return self.positions <= positions

    def clear(self) -> None:
        self.stats.evicted += len(self._blocks)
        self._blocks.clear()
        self.nbytes = 0

    def _touch(self, hashes: list[bytes]) -> None:
        for block_hash in reversed(hashes):  # leaf first: the root ends up the most recent
            if block_hash in self._blocks:
                self._blocks.move_to_end(block_hash)


def position_content(prompt_ids: list[int], placeholder_id: int, image_keys: list[str]) -> list:
    """One item per prompt position: the token id, or (image key, query index) for each of the 32
    embeddings spliced in place of a placeholder."""
    content: list[int | tuple[str, int]] = []
    images = iter(image_keys)
    for token in prompt_ids:
        if token == placeholder_id:
            key = next(images)
            content += [(key, q) for q in range(NUM_QUERY_TOKENS)]
        else:
            content.append(token)
    return content


def tensor_key(tensor) -> str:
    """Content key of an array or tensor: a hash of its dtype, shape and bytes."""
    array = tensor.detach().cpu().contiguous().numpy() if isinstance(tensor, torch.Tensor) else tensor
    digest = hashlib.blake2b(f"{array.dtype}{array.shape}".encode(), digest_size=16)
    digest.update(array.data.cast("B") if array.flags.c_contiguous else array.tobytes())
    return digest.hexdigest()


@torch.inference_mode()
def weights_fingerprint(module: torch.nn.Module) -> str:
    """A key of a module's weights: every tensor's name, dtype and shape and an even sample of its
    values. Different checkpoints, dtypes or a quantisation give different keys; cheap for 7 B."""
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in module.state_dict().items():
        flat = tensor.reshape(-1)
        step = max(1, flat.numel() // FINGERPRINT_SAMPLES)
        sample = flat[::step][:FINGERPRINT_SAMPLES].float().cpu().numpy()
        digest.update(f"{name}{tensor.dtype}{tuple(tensor.shape)}".encode())
        digest.update(sample.tobytes())
    return digest.hexdigest()
