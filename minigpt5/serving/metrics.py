"""Custom Prometheus metrics (docs/API.md "Metrics"), exported by Triton next to its `nv_*` metrics.

Each family is created by the one model that owns it; they all carry a `model` label.
"""
from __future__ import annotations

import queue
import threading
import time

import triton_python_backend_utils as pb_utils

LATENCY_BUCKETS = [0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0]
BATCH_BUCKETS = [1, 2, 4, 8, 16, 32, 64]
OUTCOMES = ("ok", "invalid", "overloaded", "cancelled", "error")
CACHE_METRICS_INTERVAL_S = 1.0  # Prometheus scrapes every 15 s or so


class LockedMetric:
    """One pb_utils Metric used from several threads. Triton 2.51's stub rewrites a metric's shared
    memory on every operation without a lock, so two threads updating the same metric at once
    corrupt what the server is reading (seen as a tritonserver SIGSEGV in Metric::LoadFromSharedMemory)."""

    def __init__(self, metric):
        self._metric = metric
        self._lock = threading.Lock()

    def increment(self, value: float) -> None:
        with self._lock:
            self._metric.increment(value)

    def set(self, value: float) -> None:
        with self._lock:
            self._metric.set(value)

    def observe(self, value: float) -> None:
        with self._lock:
            self._metric.observe(value)


def _family(name: str, description: str, kind):
    return pb_utils.MetricFamily(name=name, description=description, kind=kind)


def _histogram(name: str, description: str, model: str, buckets: list):
    family = _family(name, description, pb_utils.MetricFamily.HISTOGRAM)
    return family, LockedMetric(family.Metric(labels={"model": model}, buckets=buckets))


COUNTER, GAUGE = "COUNTER", "GAUGE"  # names in pb_utils.MetricFamily, looked up late: the stub's
# auto-complete pass imports this module before pb_utils has MetricFamily


def _metrics(model: str, specs: list[tuple[str, str, str]]) -> tuple[list, list[LockedMetric]]:
    """Families and their one metric each (label `model`), for (name, description, kind) specs."""
    families = [_family(name, description, getattr(pb_utils.MetricFamily, kind)) for name, description, kind in specs]
    return families, [LockedMetric(family.Metric(labels={"model": model})) for family in families]


class PublicModelMetrics:
    """Owned by `minigpt5`: tokens, images, outcomes, in-flight, time to first token / image."""

    def __init__(self, model: str = "minigpt5"):
        labels = {"model": model}
        self._families = [
            _family("minigpt5_generated_tokens_total", "Generated text tokens", pb_utils.MetricFamily.COUNTER),
            _family("minigpt5_vokens_total", "Generated voken positions (8 per image)", pb_utils.MetricFamily.COUNTER),
            _family("minigpt5_images_total", "Images produced", pb_utils.MetricFamily.COUNTER),
            _family("minigpt5_requests_total", "Finished requests by outcome", pb_utils.MetricFamily.COUNTER),
            _family("minigpt5_inflight_requests", "Requests being served now", pb_utils.MetricFamily.GAUGE),
        ]
        tokens, vokens, images, requests, inflight = self._families
        self.tokens = LockedMetric(tokens.Metric(labels=labels))
        self.vokens = LockedMetric(vokens.Metric(labels=labels))
        self.images = LockedMetric(images.Metric(labels=labels))
        self.requests = {o: LockedMetric(requests.Metric(labels={**labels, "outcome": o})) for o in OUTCOMES}
        self.inflight = LockedMetric(inflight.Metric(labels=labels))
        ttft_family, self.time_to_first_token = _histogram(
            "minigpt5_time_to_first_token_seconds", "Request arrival to first text delta", model, LATENCY_BUCKETS)
        ttfi_family, self.time_to_first_image = _histogram(
            "minigpt5_time_to_first_image_seconds", "Request arrival to first image", model, LATENCY_BUCKETS)
        self._families += [ttft_family, ttfi_family]
        cache_families, metrics = _metrics(model, [
            ("minigpt5_image_embedding_cache_hits_total", "Images whose embeddings came from the cache", COUNTER),
            ("minigpt5_image_embedding_cache_misses_total", "Images sent to vision_encoder", COUNTER),
            ("minigpt5_image_embedding_cache_entries", "Images held by the embedding cache", GAUGE),
            ("minigpt5_image_embedding_cache_bytes", "Bytes of embeddings held by the embedding cache", GAUGE)])
        self._families += cache_families
        self.embedding_hits, self.embedding_misses, self.embedding_entries, self.embedding_bytes = metrics

    def observe_embedding_cache(self, hits: int, misses: int, cache) -> None:
        """Images found and encoded by one request, and the cache's size now."""
        if hits:
            self.embedding_hits.increment(hits)
        if misses:
            self.embedding_misses.increment(misses)
            self.embedding_entries.set(cache.entries)
            self.embedding_bytes.set(cache.nbytes)

    def count_tokens(self, text_tokens: int, vokens: int, images: int) -> None:
        self.tokens.increment(max(text_tokens, 0))
        self.vokens.increment(vokens)
        self.images.increment(images)

    def count_request(self, outcome: str) -> None:
        self.requests[outcome].increment(1)


class DecoderMetrics:
    """Owned by `vicuna_decoder`: the rows of each engine step, prefill work and the prefix cache. Each
    metric update is an IPC round trip to tritonserver (slow when the server is busy), so the engine
    thread only queues a snapshot and a thread of its own records it."""

    def __init__(self, model: str = "vicuna_decoder"):
        self._batch_family, self.batch_size = _histogram(
            "minigpt5_decoder_batch_size", "Rows per decoder step", model, BATCH_BUCKETS)
        self._families, metrics = _metrics(model, [
            ("minigpt5_prefill_positions_total", "Prompt positions prefilled", COUNTER),
            ("minigpt5_prefix_cache_saved_positions_total", "Prompt positions taken from the prefix cache "
                                                           "instead of prefilled", COUNTER),
            ("minigpt5_prefix_cache_hits_total", "Prompt blocks found in the prefix cache", COUNTER),
            ("minigpt5_prefix_cache_misses_total", "Full prompt blocks not in the prefix cache", COUNTER),
            ("minigpt5_prefix_cache_blocks", "Blocks held by the prefix cache", GAUGE),
            ("minigpt5_prefix_cache_bytes", "Bytes of keys and values held by the prefix cache", GAUGE)])
        self.prefill, self.saved, self.hits, self.misses, self.blocks, self.bytes = metrics
        self._reported = (0, 0, 0, 0)  # the engine's totals at the last update
        self._next_update = 0.0
        self._pending: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._record, name="minigpt5-metrics", daemon=True)
        self._thread.start()

    def observe_step(self, engine) -> None:
        """After each engine step (engine thread only): a snapshot of its figures for the recording
        thread; the engine thread never waits for an update's IPC round trip."""
        cache = engine.prefix_cache
        stats = (cache.stats.hits, cache.stats.misses) if cache is not None else (0, 0)
        totals = (engine.prefill_positions_computed, engine.prefill_positions_reused, *stats)
        held = (cache.blocks, cache.nbytes) if cache is not None else None
        self._pending.put((len(engine.rows), totals, held, engine.has_work))

    def close(self, timeout: float = 5.0) -> None:
        self._pending.put(None)
        self._thread.join(timeout)

    def _record(self) -> None:
        """Every step's rows; the prefill and cache figures at most every CACHE_METRICS_INTERVAL_S and
        whenever the engine falls idle."""
        while (snapshot := self._pending.get()) is not None:
            rows, totals, held, busy = snapshot
            if rows:
                self.batch_size.observe(rows)
            now = time.monotonic()
            if now >= self._next_update or not busy:
                self._next_update = now + CACHE_METRICS_INTERVAL_S
                self._update_prefill(totals, held)

    def _update_prefill(self, totals: tuple, held: tuple | None) -> None:
        if totals == self._reported:
            return
        for metric, now, before in zip((self.prefill, self.saved, self.hits, self.misses), totals, self._reported):
            if now != before:
                metric.increment(now - before)
        self._reported = totals
        if held is not None:
            self.blocks.set(held[0])
            self.bytes.set(held[1])


class ImageMetrics:
    def __init__(self, model: str = "image_decoder"):
        self._family, self.batch_size = _histogram(
            "minigpt5_image_batch_size", "Images per image-decoder execution", model, BATCH_BUCKETS)

    def observe_image_batch(self, images: int) -> None:
        self.batch_size.observe(images)
