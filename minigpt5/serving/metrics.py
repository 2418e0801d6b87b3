"""Custom Prometheus metrics (docs/API.md "Metrics"), exported by Triton next to its `nv_*` metrics.

Each family is created by the one model that owns it; they all carry a `model` label.
"""

from __future__ import annotations

import queue
import threading
import time

import triton_python_backend_utils as pb_utils

LATENCY_BUCKETS = [0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0]
E2E_BUCKETS = [0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0, 640.0]  # up to request_timeout_s
STAGE_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 60.0]
TOKEN_LATENCY_BUCKETS = [0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5]
PROMPT_BUCKETS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 4000]
BATCH_BUCKETS = [1, 2, 4, 8, 16, 32, 64]
OUTCOMES = ("ok", "invalid", "overloaded", "cancelled", "error")
CACHE_METRICS_INTERVAL_S = 1.0  # Prometheus scrapes every 15 s or so
STATE_METRICS_INTERVAL_S = 0.5  # the decoder's waiting / running / KV gauges, while it is busy


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


class _Recorder:
    """A thread of its own that makes queued metric updates: each is an IPC round trip to
    tritonserver (slow when the server is busy), which request and dispatcher threads must not wait for."""

    def __init__(self, name: str):
        self._pending: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def put(self, update, *args) -> None:
        self._pending.put((update, args))

    def close(self, timeout: float = 5.0) -> None:
        self._pending.put(None)
        self._thread.join(timeout)

    def _run(self) -> None:
        while (item := self._pending.get()) is not None:
            update, args = item
            update(*args)


class PublicModelMetrics:
    """Owned by `minigpt5`: tokens, images, outcomes, in-flight, per-request latencies and prompt
    sizes, the latency of the stages it calls and the image queue."""

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
            "minigpt5_time_to_first_token_seconds", "Request arrival to first text delta", model, LATENCY_BUCKETS
        )
        ttfi_family, self.time_to_first_image = _histogram(
            "minigpt5_time_to_first_image_seconds", "Request arrival to first image", model, LATENCY_BUCKETS
        )
        self._families += [ttft_family, ttfi_family]
        cache_families, metrics = _metrics(
            model,
            [
                ("minigpt5_image_embedding_cache_hits_total", "Images whose embeddings came from the cache", COUNTER),
                ("minigpt5_image_embedding_cache_misses_total", "Images sent to vision_encoder", COUNTER),
                ("minigpt5_image_embedding_cache_entries", "Images held by the embedding cache", GAUGE),
                ("minigpt5_image_embedding_cache_bytes", "Bytes of embeddings held by the embedding cache", GAUGE),
            ],
        )
        self._families += cache_families
        self.embedding_hits, self.embedding_misses, self.embedding_entries, self.embedding_bytes = metrics
        histograms = [
            _histogram(name, description, model, buckets)
            for name, description, buckets in (
                (
                    "minigpt5_e2e_request_latency_seconds",
                    "Request arrival to the final response of an answer",
                    E2E_BUCKETS,
                ),
                (
                    "minigpt5_time_per_output_token_seconds",
                    "Mean time between an answer's sampled tokens after the first",
                    TOKEN_LATENCY_BUCKETS,
                ),
                (
                    "minigpt5_request_prompt_tokens",
                    "Prompt positions of an answer: text tokens and 32 per input image",
                    PROMPT_BUCKETS,
                ),
                (
                    "minigpt5_vision_latency_seconds",
                    "The vision_encoder call that encoded a request's images",
                    STAGE_BUCKETS,
                ),
                (
                    "minigpt5_image_decode_latency_seconds",
                    "The image_decoder call that decoded an image",
                    STAGE_BUCKETS,
                ),
                (
                    "minigpt5_image_queue_wait_seconds",
                    "An image's wait for the image_decoder, from its voken states to its call",
                    STAGE_BUCKETS,
                ),
            )
        ]
        self._families += [family for family, _ in histograms]
        (
            self.e2e_latency,
            self.time_per_output_token,
            self.prompt_tokens,
            self.vision_latency,
            self.image_decode_latency,
            self.image_queue_wait,
        ) = [metric for _, metric in histograms]
        self._recorder = _Recorder("minigpt5-request-metrics")

    def observe_answer(
        self, seconds: float, prompt_positions: int, sampled_tokens: int, decode_seconds: float | None
    ) -> None:
        """A finished answer (outcome ok): its latency, its prompt and, with two sampled tokens or
        more, the mean time between them (`decode_seconds`: first token to last)."""
        self._recorder.put(self._record_answer, seconds, prompt_positions, sampled_tokens, decode_seconds)

    def _record_answer(
        self, seconds: float, prompt_positions: int, sampled_tokens: int, decode_seconds: float | None
    ) -> None:
        self.e2e_latency.observe(seconds)
        self.prompt_tokens.observe(prompt_positions)
        if sampled_tokens > 1 and decode_seconds is not None:
            self.time_per_output_token.observe(decode_seconds / (sampled_tokens - 1))

    def observe_vision_call(self, waits: list[float], seconds: float) -> None:
        """One vision_encoder call, for each request whose images it carried (dispatch.BatchDispatcher)."""
        self._recorder.put(_observe_each, self.vision_latency, [seconds] * len(waits))

    def observe_image_call(self, waits: list[float], seconds: float) -> None:
        """One image_decoder call and each of its images' wait in the queue before it."""
        self._recorder.put(_observe_each, self.image_decode_latency, [seconds] * len(waits))
        self._recorder.put(_observe_each, self.image_queue_wait, waits)

    def close(self) -> None:
        self._recorder.close()

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


def _observe_each(metric: LockedMetric, values: list[float]) -> None:
    for value in values:
        metric.observe(value)


class DecoderMetrics:
    """Owned by `vicuna_decoder`: the rows of each engine step, waiting and running requests, KV-cache
    use, prefill work and latency, and the prefix cache. Each metric update is an IPC round trip to
    tritonserver (slow when the server is busy), so the engine thread only queues a snapshot and a
    thread of its own records it."""

    def __init__(self, model: str = "vicuna_decoder"):
        self._batch_family, self.batch_size = _histogram(
            "minigpt5_decoder_batch_size", "Rows per decoder step", model, BATCH_BUCKETS
        )
        self._prefill_family, self.prefill_latency = _histogram(
            "minigpt5_prefill_latency_seconds",
            "Prefill of one request's prompt and its first token",
            model,
            STAGE_BUCKETS,
        )
        self._state_families, state = _metrics(
            model,
            [
                ("minigpt5_num_requests_waiting", "Requests waiting for a decoder row (rows or KV budget full)", GAUGE),
                ("minigpt5_num_requests_running", "Requests in the decoder's batch", GAUGE),
                ("minigpt5_kv_cache_used_positions", "KV-cache positions reserved by the running requests", GAUGE),
                ("minigpt5_kv_cache_usage_ratio", "Reserved KV-cache positions / kv_cache_budget_tokens", GAUGE),
            ],
        )
        self.waiting, self.running, self.kv_positions, self.kv_ratio = state
        self._state = (0, 0, 0)  # (waiting, running, reserved positions) as last set
        self._next_state = 0.0
        self._families, metrics = _metrics(
            model,
            [
                ("minigpt5_prefill_positions_total", "Prompt positions prefilled", COUNTER),
                (
                    "minigpt5_prefix_cache_saved_positions_total",
                    "Prompt positions taken from the prefix cache instead of prefilled",
                    COUNTER,
                ),
                ("minigpt5_prefix_cache_hits_total", "Prompt blocks found in the prefix cache", COUNTER),
                ("minigpt5_prefix_cache_misses_total", "Full prompt blocks not in the prefix cache", COUNTER),
                ("minigpt5_prefix_cache_blocks", "Blocks held by the prefix cache", GAUGE),
                ("minigpt5_prefix_cache_bytes", "Bytes of keys and values held by the prefix cache", GAUGE),
            ],
        )
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
        state = (engine.num_waiting, len(engine.rows), engine.reserved_positions, engine.kv_budget_tokens)
        self._pending.put((len(engine.rows), totals, held, engine.has_work, state, engine.step_prefill_seconds))

    def close(self, timeout: float = 5.0) -> None:
        self._pending.put(None)
        self._thread.join(timeout)

    def _record(self) -> None:
        """Every step's rows and prefills; the waiting / running / KV gauges at most every
        STATE_METRICS_INTERVAL_S, the prefill and cache figures at most every CACHE_METRICS_INTERVAL_S,
        and both whenever the engine falls idle (so the gauges read 0 once the work is done)."""
        while (snapshot := self._pending.get()) is not None:
            rows, totals, held, busy, state, prefills = snapshot
            if rows:
                self.batch_size.observe(rows)
            for seconds in prefills:
                self.prefill_latency.observe(seconds)
            now = time.monotonic()
            if now >= self._next_state or not busy:
                self._next_state = now + STATE_METRICS_INTERVAL_S
                self._update_state(*state)
            if now >= self._next_update or not busy:
                self._next_update = now + CACHE_METRICS_INTERVAL_S
                self._update_prefill(totals, held)

    def _update_state(self, waiting: int, running: int, reserved: int, budget: int) -> None:
        if (waiting, running, reserved) == self._state:
            return
        self._state = (waiting, running, reserved)
        self.waiting.set(waiting)
        self.running.set(running)
        self.kv_positions.set(reserved)
        self.kv_ratio.set(reserved / budget if budget else 0.0)

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
            "minigpt5_image_batch_size", "Images per image-decoder execution", model, BATCH_BUCKETS
        )

    def observe_image_batch(self, images: int) -> None:
        self.batch_size.observe(images)
