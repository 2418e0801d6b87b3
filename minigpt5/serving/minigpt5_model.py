"""`minigpt5`: the public model. Decoupled; streams text deltas and images in one answer.

Per request (in a worker thread, so `execute` returns at once and requests run concurrently):
validate → prompt ids → image embeddings (from the embedding cache, embedding_cache.py, or
`vision_encoder` by BLS for the images not in it) → `vicuna_decoder`, the continuous-batching
decoder, reached through the decoder link (decoder_link.py: one unary BLS call per engine step for
all requests); text deltas go out as they come; each voken block queues an `image_decoder` job (BLS)
while text keeps streaming; when the decoder ends, the remaining images are awaited and the final
event (usage) sent. Every child call is unary: Triton 2.51 breaks under concurrent decoupled BLS.
Calls to the batched stages and all responses go through single threads (dispatch.py): that
batches the stages across requests and keeps the stub's IPC orderly.

The request thread wakes at least every CANCEL_CHECK_S: when the client has cancelled or
disconnected, or request_timeout_s has passed, the request's decoder row is aborted (its KV cache
freed at the next step) and its pending images dropped.
"""

from __future__ import annotations

import concurrent.futures
import threading
import time
import uuid
from dataclasses import dataclass

import numpy as np
import triton_python_backend_utils as pb_utils

from minigpt5_client.contract import SCALAR_INPUTS

from ..engine import Finished, TextDelta, VokenStates
from ..image_decoder import SCHEDULERS, image_seed
from ..launcher.contract import ShutdownFlag
from ..request import InvalidRequest, request_from_inputs
from ..stages import PromptBuilder
from . import runtime, triton_io
from .answer_stream import AnswerStream
from .decoder_link import DecoderLink, DecodeStream
from .dispatch import BatchDispatcher, ResponseWriter
from .embedding_cache import EmbeddingCache, weights_key
from .options import PublicModelOptions

VISION_MAX_BATCH = 8  # = vision_encoder's max_batch_size
IMAGE_MAX_BATCH = 8  # = image_decoder's max_batch_size
CANCEL_CHECK_S = 0.1  # client-gone checks per request at most this often: each is an IPC round trip


@dataclass
class ImageRequest:
    voken_states: np.ndarray  # [8, H]
    seed: int
    guidance_scale: float
    steps: int
    scheduler_id: int


class MiniGPT5Model:
    def __init__(self, args: dict, metrics=None):
        params = runtime.model_parameters(args)
        weights = runtime.open_weights(params)
        self.prompts = PromptBuilder(weights)
        self.defaults = weights.defaults
        self.metrics = metrics
        options = PublicModelOptions.from_parameters(params)
        self.max_inflight = options.max_inflight_requests
        self.request_timeout_s = options.request_timeout_s
        self.stream_interval_s = options.stream_interval_ms / 1000
        cache_bytes = int(options.image_embedding_cache_mb * 2**20)
        self.embeddings = EmbeddingCache(cache_bytes, weights_key(weights))
        self.decoder = DecoderLink(self._call_decoder)
        self._shutdown = ShutdownFlag(args.get("model_repository"))
        self._inflight = 0
        self._inflight_lock = threading.Lock()
        self._workers = concurrent.futures.ThreadPoolExecutor(self.max_inflight, thread_name_prefix="minigpt5-req")
        self._encoders = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="minigpt5-png")
        self._writer = ResponseWriter(
            triton_io.send, lambda exc: triton_io.log_warn(f"minigpt5: could not send a response: {exc!r}")
        )
        self._vision_calls = BatchDispatcher(
            "vision",
            self._call_vision,
            rows=len,
            max_rows=VISION_MAX_BATCH,
            on_call=metrics.observe_vision_call if metrics else None,
        )
        self._image_calls = BatchDispatcher(
            "images",
            self._call_image_decoder,
            rows=lambda job: 1,
            max_rows=IMAGE_MAX_BATCH,
            on_call=metrics.observe_image_call if metrics else None,
        )
        triton_io.log_info(
            f"minigpt5: weights {weights.path}; max {self.max_inflight} requests in flight; "
            f"request timeout {self.request_timeout_s:g} s; image embedding cache "
            f"{cache_bytes / 2**20:g} MiB"
        )

    def execute(self, requests: list) -> None:
        for request in requests:
            sender = request.get_response_sender()
            refusal = self._admit()
            if refusal:
                self._count("overloaded")
                self._writer.put(sender, triton_io.error_response(triton_io.Overloaded(refusal)), True)
                continue
            self._set_inflight_gauge()
            self._workers.submit(self._serve_and_release, request, sender)
        return None

    def _admit(self) -> str | None:
        """Take an in-flight slot, or say why not."""
        if self._shutdown.raised():  # `minigpt5 serve` is draining before it stops tritonserver
            return "server busy: shutting down, not accepting new requests; retry on another replica"
        with self._inflight_lock:
            if self._inflight < self.max_inflight:
                self._inflight += 1
                return None
        return f"server busy: {self.max_inflight} requests in flight (max_inflight_requests); retry later"

    def finalize(self) -> None:
        # Triton waits for in-flight requests (--exit-timeout-secs) before unloading; whatever is
        # still blocked in a child call by now must not hold the stub process forever.
        self._workers.shutdown(wait=False, cancel_futures=True)
        self.decoder.close()
        self._vision_calls.close()
        self._image_calls.close()
        self._encoders.shutdown(wait=False, cancel_futures=True)
        self._writer.close()
        if self.metrics:
            self.metrics.close()

    # ---- one request ----------------------------------------------------------------------------
    def _serve_and_release(self, request, sender) -> None:
        released: list[bool] = []

        def release() -> None:
            """Free the in-flight slot once, before the final response goes out: a client that sends
            its next request on seeing the end of the last one must find the slot free."""
            if not released:
                released.append(True)
                with self._inflight_lock:
                    self._inflight -= 1
                self._set_inflight_gauge()

        try:
            self._serve(request, sender, release)
        finally:
            release()

    def _serve(self, request, sender, release=lambda: None) -> None:
        arrived = time.monotonic()

        def post(reply, final: bool) -> None:
            if final:
                release()
            self._writer.put(sender, reply, final)

        answer = AnswerStream(post, stream=False)
        try:
            generation = self._parse(request)
            answer.streaming = generation.stream
            prompt_ids = self.prompts.prompt_ids(generation)
            image_embeds, image_keys = self._encode_images(generation.images)
            outcome = self._generate(generation, prompt_ids, image_embeds, image_keys, answer, sender, arrived)
            self._count(outcome)
        except InvalidRequest as exc:
            self._count("invalid")
            answer.fail(exc)
        except triton_io.Overloaded as exc:
            self._count("overloaded")
            answer.fail(exc)
        except Exception as exc:  # noqa: BLE001 - every failure still ends the stream
            triton_io.log_error(f"minigpt5: request failed: {exc!r}")
            self._count("error")
            answer.fail(exc)

    def _parse(self, request):
        return request_from_inputs(
            {name: triton_io.input_scalar(request, name) for name in SCALAR_INPUTS},
            triton_io.input_array(request, "images"),
            triton_io.input_strings(request, "image_bytes"),
            defaults=self.defaults,
        )

    def _encode_images(self, images: np.ndarray) -> tuple[np.ndarray | None, list[str] | None]:
        """Embeddings [N, 32, H] and their content keys; only images not in the cache go to `vision_encoder`."""
        if not len(images):
            return None, None
        if not self.embeddings.max_bytes:
            return self._vision_calls.submit(images).result(), None  # the decoder hashes them itself
        entries, encoded = self.embeddings.encode(images, lambda todo: self._vision_calls.submit(todo).result())
        if self.metrics:  # on the PNG threads, off the request's path: a metric update is an IPC round trip
            self._encoders.submit(self.metrics.observe_embedding_cache, len(images) - encoded, encoded, self.embeddings)
        return np.stack([entry.embeds for entry in entries]), [entry.key for entry in entries]

    @staticmethod
    def _call_vision(batches: list[np.ndarray]) -> list[np.ndarray]:
        """One `vision_encoder` request for the images of several requests, split back per request."""
        child = pb_utils.InferenceRequest(
            model_name="vision_encoder",
            requested_output_names=["image_embeds"],
            inputs=[triton_io.tensor("images", np.concatenate(batches))],
        )
        reply = child.exec()
        triton_io.raise_if_error(reply)
        embeds = triton_io.required_output(reply, "image_embeds")
        bounds = np.cumsum([len(b) for b in batches])[:-1]
        return np.split(embeds, bounds)

    def _generate(self, generation, prompt_ids, image_embeds, image_keys, answer: AnswerStream, sender, arrived) -> str:
        deadline = arrived + self.request_timeout_s
        stream = self.decoder.open(
            f"minigpt5-{uuid.uuid4().hex}", prompt_ids, image_embeds, generation.sampling, image_keys
        )
        images: list[concurrent.futures.Future] = []  # each ends once its image was sent
        try:
            finished = self._relay(stream, generation, answer, images, sender, arrived, deadline)
        except BaseException:
            _stop(stream, images)
            raise
        if finished is None or not self._images_sent(stream, images, sender, deadline):  # the client is gone
            _stop(stream, images)
            answer.cancel()
            return "cancelled"
        usage = {
            "prompt_tokens": len(prompt_ids) - len(generation.images),
            "image_tokens": 0 if image_embeds is None else int(image_embeds.shape[0] * image_embeds.shape[1]),
            "completion_tokens": finished.completion_tokens,
            "vokens": 8 * len(images),
            "images": len(images),
            "sampled_tokens": finished.sampled_tokens,
            "cached_prompt_positions": finished.cached_positions,
            "seed": generation.seed,
        }
        if self.metrics:
            self.metrics.count_tokens(finished.completion_tokens - usage["vokens"], usage["vokens"], len(images))
        answer.finish(finished.reason, usage)
        if self.metrics:
            self.metrics.observe_answer(
                time.monotonic() - arrived,
                usage["prompt_tokens"] + usage["image_tokens"],
                finished.sampled_tokens,
                stream.decode_seconds,
            )
        return "ok"

    def _relay(
        self,
        stream: DecodeStream,
        generation,
        answer: AnswerStream,
        images: list,
        sender,
        arrived: float,
        deadline: float,
    ) -> Finished | None:
        """Decoder events → answer events, until the decoder's Finished (returned) or the client is
        gone (None). Raises Overloaded at the request's deadline."""
        next_check = arrived + CANCEL_CHECK_S
        first_text, hold_text_until = True, 0.0  # the first text goes out at once
        while True:
            now = time.monotonic()
            if now >= deadline:
                raise self._timed_out()
            if now >= next_check:
                next_check = now + CANCEL_CHECK_S
                if sender.is_cancelled():
                    return None
            event = stream.next_event(min(next_check, deadline) - now, min(hold_text_until, next_check, deadline))
            if isinstance(event, Finished):
                return event
            if isinstance(event, TextDelta) and event.text:
                if first_text and self.metrics:
                    self.metrics.time_to_first_token.observe(time.monotonic() - arrived)
                first_text = False
                answer.text_delta(event.text)
                hold_text_until = time.monotonic() + self.stream_interval_s
            elif isinstance(event, VokenStates):
                answer.image_start(event.text_offset)
                job = ImageRequest(
                    np.asarray(event.states),
                    image_seed(generation.seed, len(images)),
                    generation.guidance_scale,
                    generation.num_inference_steps,
                    SCHEDULERS.index(generation.scheduler),
                )
                images.append(self._image_sent(job, answer, event.text_offset, arrived, first=not images))

    def _images_sent(self, stream: DecodeStream, images: list, sender, deadline: float) -> bool:
        """Wait until every image was sent (True) or the client is gone (False), checking the client
        every CANCEL_CHECK_S. Image errors raise here and fail the request; so does the deadline."""
        for future in images:
            while True:
                now = time.monotonic()
                if now >= deadline:
                    _stop(stream, images)
                    raise self._timed_out()
                try:
                    future.result(timeout=min(CANCEL_CHECK_S, deadline - now))
                    break
                except concurrent.futures.TimeoutError:
                    if sender.is_cancelled():
                        return False
        return True

    def _timed_out(self) -> triton_io.Overloaded:
        return triton_io.Overloaded(f"request took longer than request_timeout_s={self.request_timeout_s}")

    def _image_sent(
        self, job: ImageRequest, answer: AnswerStream, offset: int, arrived: float, first: bool
    ) -> concurrent.futures.Future:
        """Queue the image; once decoded, PNG-encode and send it. The future ends when it was sent."""
        sent: concurrent.futures.Future = concurrent.futures.Future()

        def deliver(image):
            if first and self.metrics:
                self.metrics.time_to_first_image.observe(time.monotonic() - arrived)
            answer.image(image, offset)

        def on_decoded(decoded: concurrent.futures.Future):
            if not sent.set_running_or_notify_cancel():
                return  # the request was cancelled meanwhile: nothing to send
            if decoded.cancelled():
                sent.set_exception(concurrent.futures.CancelledError())
                return
            if decoded.exception() is not None:
                sent.set_exception(decoded.exception())
                return
            encoding = self._encoders.submit(deliver, decoded.result())
            encoding.add_done_callback(
                lambda done: sent.set_exception(done.exception()) if done.exception() else sent.set_result(None)
            )

        self._image_calls.submit(job).add_done_callback(on_decoded)
        return sent

    @staticmethod
    def _call_decoder(link_id: str, commands: str, image_embeds: np.ndarray | None) -> tuple[str, np.ndarray | None]:
        """One link call to `vicuna_decoder` (decoder_wire.py): new requests and aborts in, events out."""
        inputs = [triton_io.string_tensor("link_id", link_id), triton_io.string_tensor("commands", commands)]
        if image_embeds is not None:
            inputs.append(triton_io.tensor("image_embeds", image_embeds))
        child = pb_utils.InferenceRequest(
            model_name="vicuna_decoder", inputs=inputs, requested_output_names=["events", "voken_states"]
        )
        reply = child.exec()
        triton_io.raise_if_error(reply)
        events = triton_io.required_output(reply, "events").reshape(-1)[0]
        return triton_io.decode_text("events", events), triton_io.output_array(reply, "voken_states")

    @staticmethod
    def _call_image_decoder(jobs: list[ImageRequest]) -> list[np.ndarray]:
        """One batched `image_decoder` request for the images of several requests."""
        child = pb_utils.InferenceRequest(
            model_name="image_decoder",
            requested_output_names=["image"],
            inputs=[
                triton_io.tensor("voken_states", np.stack([j.voken_states for j in jobs]).astype(np.float32)),
                triton_io.tensor("seed", np.array([[j.seed] for j in jobs], dtype=np.uint64)),
                triton_io.tensor("guidance_scale", np.array([[j.guidance_scale] for j in jobs], dtype=np.float32)),
                triton_io.tensor("num_inference_steps", np.array([[j.steps] for j in jobs], dtype=np.int32)),
                triton_io.tensor("scheduler_id", np.array([[j.scheduler_id] for j in jobs], dtype=np.int32)),
            ],
        )
        reply = child.exec()
        triton_io.raise_if_error(reply)
        return list(triton_io.required_output(reply, "image"))

    def _count(self, outcome: str) -> None:
        if self.metrics:
            self.metrics.count_request(outcome)

    def _set_inflight_gauge(self) -> None:
        if self.metrics:
            self.metrics.inflight.set(self._inflight)


def _stop(stream: DecodeStream, images: list[concurrent.futures.Future]) -> None:
    """A request that ends early: its decoder row is aborted, its images still queued are dropped."""
    stream.abort()
    for future in images:
        future.cancel()
