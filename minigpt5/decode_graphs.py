"""The engine's 1-token decode step at static shapes, replayed as CUDA graphs on a GPU.

Why: a 7B decode step is ~500 small kernels. Launched one by one from Python they take longer on the
host than the H100 needs to run them (its floor is ~4 ms per step in bf16), so the GPU idles. A CUDA
graph launches the whole step at once. Graphs want static shapes and fixed addresses, so:
- the batch is padded to a bucket (1, 2, 4, … up to max_rows). Padding rows feed `pad_id` at position
  0 of free slots: slots past the running rows hold nothing, and a row admitted there later writes
  its positions before it reads them;
- attention spans a bucket of slot positions (256, 512, … up to the context) instead of the longest
  row; the per-row mask hides the rest, exactly as in the engine's dynamic step;
- token ids and positions are copied into fixed buffers before each replay, and the KV pool must be
  allocated whole first (`kv_preallocate`): a graph keeps the addresses it was captured with.
Off a GPU the same static computation runs eagerly (`capture=False`): that is what the CPU tests
compare with the dynamic step, so only the capture itself needs CUDA.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch

MIN_KEY_BUCKET = 256
WARMUP_RUNS = 2  # before capture, on a side stream (CUDA's recipe: lazy init stays out of the graph)

log = logging.getLogger(__name__)


class StaticDecodeStep:
    """`run(ids, positions)` → final-norm states [n, H] of one token per row, rows in slots 0..n-1."""

    def __init__(
        self, forward: Callable, *, max_rows: int, max_positions: int, pad_id: int, device: torch.device, capture: bool
    ):
        """`forward(ids, positions, keys_total)` is the engine's step: [B, 1] ids at [B, 1] positions
        for the rows in slots 0..B-1, attending over their first `keys_total` positions."""
        self._forward = forward
        self.batch_buckets = _buckets(1, max_rows)
        self.key_buckets = _buckets(min(MIN_KEY_BUCKET, max_positions), max_positions)
        self.pad_id, self.device, self.capture = pad_id, device, capture
        self._ids = torch.full((max_rows, 1), pad_id, dtype=torch.long, device=device)
        self._positions = torch.zeros((max_rows, 1), dtype=torch.long, device=device)
        self._graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._pool: torch.cuda._POOL_HANDLE | None = None

    @torch.inference_mode()
    def capture_all(self) -> None:
        """Capture every (batch, keys) bucket now, while no row runs (the captures write position 0
        of the slots they span)."""
        start = time.perf_counter()
        for batch in self.batch_buckets:
            for keys in self.key_buckets:
                self._graphs[batch, keys] = self._capture(batch, keys)
        torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - start
        log.info(
            "captured %d decode CUDA graphs (batch %s × keys %s) in %.1f s",
            len(self._graphs),
            self.batch_buckets,
            self.key_buckets,
            seconds,
        )

    def run(self, ids: list[int], positions: list[int]) -> torch.Tensor:
        rows = len(ids)
        batch = _bucket(rows, self.batch_buckets)
        keys = _bucket(max(positions) + 1, self.key_buckets)
        padding = batch - rows
        inputs = torch.tensor([ids + [self.pad_id] * padding, positions + [0] * padding], dtype=torch.long)
        self._ids[:batch, 0].copy_(inputs[0], non_blocking=True)
        self._positions[:batch, 0].copy_(inputs[1], non_blocking=True)
        if self.capture:
            graph, hidden = self._graphs[batch, keys]
            graph.replay()
        else:
            hidden = self._step(batch, keys)
        return hidden[:rows, 0]

    def _step(self, batch: int, keys: int) -> torch.Tensor:
        return self._forward(self._ids[:batch], self._positions[:batch], keys)

    def _capture(self, batch: int, keys: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        current = torch.cuda.current_stream(self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(current)
        with torch.cuda.stream(side):
            for _ in range(WARMUP_RUNS):
                self._step(batch, keys)
        current.wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):  # one memory pool for all: they never run at once
            hidden = self._step(batch, keys)
        self._pool = graph.pool()
        return graph, hidden


def _buckets(smallest: int, largest: int) -> list[int]:
    """Powers of two from `smallest`, and `largest` itself."""
    out, size = [], smallest
    while size < largest:
        out.append(size)
        size *= 2
    return out + [largest]


def _bucket(need: int, buckets: list[int]) -> int:
    return next(size for size in buckets if size >= need)
