"""`vicuna_decoder`: the continuous-batching Vicuna decoder as a Triton model of its own.

Not decoupled: `minigpt5` reaches it with unary BLS calls only (Triton 2.51's python backend hangs or
corrupts its heap under concurrent decoupled BLS streams; docs/RELIABILITY.md). One engine thread
steps the `DecodeEngine` whenever it has work and files each step's events in the outbox of the
`minigpt5` instance (link) that submitted the request. Each call (decoder_wire.py) carries new
requests and aborts in and takes the link's outbox out: at once when it holds events, else as soon
as a step puts some there, or empty after `link_wait_ms`. The engine never waits for a call.
"""

from __future__ import annotations

import threading

import torch

from ..engine import AdmissionError, Finished
from ..errors import InvalidRequest, Overloaded
from ..placement import on_gpu_by_default
from ..stages import DecoderStage
from . import runtime, triton_io
from .decoder_wire import Failure, NewRequest, decode_commands, encode_events
from .options import DecoderOptions

IDLE_WAIT_S = 0.5  # the engine thread re-checks for shutdown at least this often when idle


class EngineLoop:
    """Owns the DecodeEngine and its thread; events wait in one outbox per link until collected."""

    def __init__(self, stage: DecoderStage, observe_step=None):
        self.stage = stage
        self.engine = stage.engine
        self._observe_step = observe_step  # called with the engine after each step (metrics)
        self._owner: dict[str, str] = {}  # request id → link id, until its Finished
        self._outbox: dict[str, list] = {}  # link id → events not collected yet
        self._events = threading.Condition()  # guards _owner and _outbox; notified when events arrive
        self._work = threading.Condition()
        self._running = True
        self.stage.warmup()  # before the engine thread exists: warmup drives the engine itself
        self._thread = threading.Thread(target=self._loop, name="minigpt5-engine", daemon=True)
        self._thread.start()

    def submit(self, link_id: str, request: NewRequest) -> None:
        """Queue a request; one that can never fit (context, KV budget) is refused in the outbox."""
        try:
            embeds = None if request.image_embeds is None else torch.from_numpy(request.image_embeds)
            decode_request = self.stage.make_request(
                request.request_id, request.prompt_ids, embeds, request.sampling, request.image_keys
            )
            with self._events:
                if not self._running:
                    raise Overloaded("model is unloading")
                self._owner[request.request_id] = link_id
            self.engine.submit(decode_request)
        except (AdmissionError, InvalidRequest, Overloaded) as exc:
            error = exc if isinstance(exc, (InvalidRequest, Overloaded)) else InvalidRequest(str(exc))
            self._post([Failure(request.request_id, error)], link_id)
            return
        self._wake()

    def abort(self, request_id: str) -> None:
        """Its row leaves the batch at the next step; its Finished("aborted") still reaches the link."""
        self.engine.abort(request_id)
        self._wake()

    def collect(self, link_id: str, timeout: float) -> list:
        """The link's events; waits up to `timeout` for the next step that has some."""
        with self._events:
            self._events.wait_for(lambda: self._outbox.get(link_id) or not self._running, timeout)
            return self._outbox.pop(link_id, [])

    def close(self, timeout: float = 30.0) -> None:
        """Stop the engine thread; requests not finished get an UNAVAILABLE error."""
        with self._events:
            self._running = False
            owners, self._owner = self._owner, {}
        self._wake()
        self._thread.join(timeout)
        for request_id, link_id in owners.items():
            self._post([Failure(request_id, Overloaded("model is unloading"))], link_id)

    # ---- the engine thread ------------------------------------------------------------------------
    def _loop(self) -> None:
        while self._running:
            with self._work:
                while self._running and not self.engine.has_work:
                    self._work.wait(timeout=IDLE_WAIT_S)
            if not self._running:
                return
            try:
                events = self.engine.step()
            except Exception as exc:  # noqa: BLE001 - a broken step must not strand its requests
                failure = RuntimeError(f"decoder step failed: {exc!r}")
                events = [Failure(request_id, failure) for request_id in self.engine.drop_running()]
            self._post(events)  # first: a metric update is an IPC round trip, not to be waited for by a token
            if self._observe_step:
                self._observe_step(self.engine)

    def _post(self, events: list, link_id: str | None = None) -> None:
        """File events in their links' outboxes (`link_id`, else each request's owner) and wake collectors."""
        if not events:
            return
        with self._events:
            for event in events:
                ends = isinstance(event, (Finished, Failure))
                owner = link_id or (
                    self._owner.pop(event.request_id, None) if ends else self._owner.get(event.request_id)
                )
                if owner is not None:
                    self._outbox.setdefault(owner, []).append(event)
            self._events.notify_all()

    def _wake(self) -> None:
        with self._work:
            self._work.notify()


class VicunaDecoderModel:
    def __init__(self, args: dict, metrics=None):
        where = runtime.placement(args, gpu_dtype="bf16")
        options = DecoderOptions.from_parameters(where.params)
        quantization = options.llm_quantization
        self.link_wait_s = options.link_wait_ms / 1000
        stage = DecoderStage.load(
            where.weights,
            where.device,
            where.dtype,
            quantization=quantization,
            kv_budget_tokens=options.kv_cache_budget_tokens,
            max_rows=options.max_batch_rows,
            max_prefill_tokens=options.max_prefill_tokens_per_step,
            preallocate_kv=on_gpu_by_default(where.params, "kv_preallocate", where.device),
            static_decode=on_gpu_by_default(where.params, "decode_cuda_graphs", where.device),
            capture_fallback=options.decode_cuda_graphs == "auto",
            prefix_cache_tokens=options.prefix_cache_tokens,
            prefix_block_tokens=options.prefix_cache_block_tokens,
        )
        self.metrics = metrics
        self.loop = EngineLoop(stage, observe_step=metrics.observe_step if metrics else None)
        engine = stage.engine
        cache = engine.prefix_cache
        caching = (
            f"prefix cache {cache.max_positions} positions in blocks of {cache.block_positions}"
            if cache is not None
            else "prefix cache off"
        )
        triton_io.log_info(
            f"{where.describe('vicuna_decoder')}; decode: {engine.decode_mode}; "
            f"LLM quantization: {quantization}; {engine.max_rows} rows, KV budget "
            f"{engine.kv_budget_tokens} positions; {caching}"
        )
        if engine.capture_error:
            triton_io.log_warn(
                f"vicuna_decoder: decode CUDA graphs failed, decoding eagerly (slower): {engine.capture_error}"
            )

    def execute(self, requests: list) -> list:
        return [self._answer(request) for request in requests]

    def _answer(self, request):
        try:
            link_id = triton_io.input_scalar(request, "link_id")
            commands = decode_commands(
                triton_io.input_scalar(request, "commands"), triton_io.input_array(request, "image_embeds")
            )
            for request_id in commands.abort:
                self.loop.abort(request_id)
            for new in commands.submit:
                self.loop.submit(link_id, new)
            text, states = encode_events(self.loop.collect(link_id, self.link_wait_s))
        except Exception as exc:  # noqa: BLE001 - the link sees the error and fails its requests
            return triton_io.error_response(exc)
        tensors = [triton_io.string_tensor("events", text)]
        if states is not None:
            tensors.append(triton_io.tensor("voken_states", states))
        return triton_io.response(tensors)

    def finalize(self) -> None:
        self.loop.close()
        if self.metrics:
            self.metrics.close()
