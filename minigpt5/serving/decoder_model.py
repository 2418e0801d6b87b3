"""`vicuna_decoder`: decoupled; the continuous-batching engine behind Triton.

Lifecycle (vllm_backend style): `execute` only parses and queues; an engine thread runs
`DecodeEngine.step()` while there is work; a sender thread turns engine events into responses, so
Triton IPC never stalls the decode loop. A request ends with exactly one FINAL response, always.

Abort: a request carrying `abort_request_id` stops that request (BLS in Triton 2.51 cannot cancel a
child stream, so the public model uses this when its own client goes away). The decoder does not
poll `is_cancelled()` (an IPC round trip per request): its client is the BLS model, whose child
requests Triton 2.51 never cancels.
"""
from __future__ import annotations

import itertools
import queue
import threading

import numpy as np

from ..engine import AdmissionError, Finished, TextDelta, VokenStates
from ..request import InvalidRequest
from ..sampling import SamplingParams
from ..stages import DecoderStage
from . import runtime, triton_io

IDLE_WAIT_S = 0.5


class VicunaDecoderModel:
    def __init__(self, args: dict, metrics=None):
        where = runtime.placement(args, gpu_dtype="bf16")
        params = where.params
        self.stage = DecoderStage.load(
            where.weights, where.device, where.dtype,
            kv_budget_tokens=int(params.get("kv_cache_budget_tokens", 65536)),
            max_rows=int(params.get("max_batch_rows", 32)),
            max_prefill_tokens=int(params.get("max_prefill_tokens_per_step", 4096)),
        )
        self.engine = self.stage.engine
        self.metrics = metrics
        self._senders: dict[str, object] = {}
        self._senders_lock = threading.Lock()
        self._work = threading.Condition()
        self._outbox: queue.Queue = queue.Queue()
        self._running = True
        self._ids = itertools.count()
        self._engine_thread = threading.Thread(target=self._engine_loop, name="minigpt5-engine", daemon=True)
        self._sender_thread = threading.Thread(target=self._send_loop, name="minigpt5-sender", daemon=True)
        self.stage.warmup()  # before the engine thread exists: warmup drives the engine itself
        self._engine_thread.start()
        self._sender_thread.start()
        triton_io.log_info(where.describe("vicuna_decoder"))

    # ---- Triton entry points --------------------------------------------------------------------
    def execute(self, requests: list) -> None:
        for request in requests:
            sender = request.get_response_sender()
            try:
                abort_id = triton_io.input_scalar(request, "abort_request_id")
                if abort_id:
                    self.engine.abort(abort_id)
                    triton_io.send(sender, triton_io.response([triton_io.string_tensor("finish_reason", "")]),
                                   final=True)
                    continue
                self._submit(request, sender)
            except Exception as exc:  # noqa: BLE001 - every failure still ends the stream
                triton_io.send(sender, triton_io.error_response(exc), final=True)
        return None

    def finalize(self) -> None:
        self._running = False
        with self._work:
            self._work.notify_all()
        self._engine_thread.join(timeout=30)
        self._outbox.put(None)
        self._sender_thread.join(timeout=30)
        with self._senders_lock:
            senders, self._senders = self._senders, {}
        for sender in senders.values():
            self._send_safely(sender, triton_io.error_response(triton_io.Overloaded("model is unloading")), True)

    # ---- request intake -------------------------------------------------------------------------
    def _submit(self, request, sender) -> None:
        request_id = request.request_id() or f"decoder-{next(self._ids)}"
        decode_request = self.stage.make_request(request_id, self._prompt_ids(request),
                                                 self._image_embeds(request), self._sampling(request))
        with self._senders_lock:
            if request_id in self._senders:
                raise InvalidRequest(f"request id {request_id!r} is already in use")
            self._senders[request_id] = sender
        try:
            self.engine.submit(decode_request)
        except AdmissionError as exc:
            with self._senders_lock:
                self._senders.pop(request_id, None)
            raise InvalidRequest(str(exc)) from None
        with self._work:
            self._work.notify()

    @staticmethod
    def _prompt_ids(request) -> list[int]:
        ids = triton_io.input_array(request, "input_ids")
        if ids is None or ids.size == 0:
            raise InvalidRequest("input_ids: required, at least one token")
        return ids.reshape(-1).astype(np.int64).tolist()

    @staticmethod
    def _image_embeds(request):
        import torch
        embeds = triton_io.input_array(request, "image_embeds")
        return None if embeds is None or embeds.size == 0 else torch.from_numpy(embeds.astype(np.float32))

    @staticmethod
    def _sampling(request) -> SamplingParams:
        def get(name, default):
            value = triton_io.input_scalar(request, name)
            return default if value is None else value
        defaults = SamplingParams()
        return SamplingParams(
            max_tokens=int(get("max_tokens", defaults.max_tokens)),
            temperature=float(get("temperature", defaults.temperature)),
            top_p=float(get("top_p", defaults.top_p)),
            top_k=int(get("top_k", defaults.top_k)),
            repetition_penalty=float(get("repetition_penalty", defaults.repetition_penalty)),
            seed=triton_io.input_scalar(request, "random_seed"),
            force_image=bool(get("force_image", False)),
            max_images=int(get("max_images", defaults.max_images)),
        )

    # ---- the engine loop ------------------------------------------------------------------------
    def _engine_loop(self) -> None:
        while self._running:
            with self._work:
                while self._running and not self.engine.has_work:
                    self._work.wait(timeout=IDLE_WAIT_S)
            if not self._running:
                return
            try:
                events = self.engine.step()
            except Exception as exc:  # noqa: BLE001 - a broken step must not strand its requests
                triton_io.log_error(f"vicuna_decoder: step failed: {exc!r}; failing the running requests")
                events = self._fail_running(exc)
            if self.metrics and self.engine.rows:
                self.metrics.observe_decoder_batch(len(self.engine.rows))
            for event in events:
                self._outbox.put(event)

    def _fail_running(self, exc: Exception) -> list:
        return [(request_id, exc) for request_id in self.engine.drop_running()]

    # ---- the sender thread ----------------------------------------------------------------------
    def _send_loop(self) -> None:
        while (event := self._outbox.get()) is not None:
            self._deliver(event)

    def _deliver(self, event) -> None:
        if isinstance(event, tuple):  # (request_id, exception) from a failed step
            request_id, exc = event
            sender = self._pop_sender(request_id)
            if sender:
                self._send_safely(sender, triton_io.error_response(exc), True)
            return
        final = isinstance(event, Finished)
        with self._senders_lock:
            sender = self._senders.pop(event.request_id, None) if final else self._senders.get(event.request_id)
        if sender is None:
            return
        self._send_safely(sender, triton_io.response(self._tensors(event)), final)

    @staticmethod
    def _tensors(event) -> list:
        if isinstance(event, TextDelta):
            return [triton_io.string_tensor("text_output", event.text)]
        if isinstance(event, VokenStates):
            return [triton_io.tensor("voken_states", event.states.numpy()[None]),
                    triton_io.tensor("voken_offset", np.array([event.text_offset], dtype=np.int32))]
        return [triton_io.string_tensor("finish_reason", event.reason),
                triton_io.tensor("completion_tokens", np.array([event.completion_tokens], dtype=np.int32)),
                triton_io.tensor("token_ids", np.array(event.token_ids, dtype=np.int32))]

    def _pop_sender(self, request_id: str):
        with self._senders_lock:
            return self._senders.pop(request_id, None)

    @staticmethod
    def _send_safely(sender, reply, final: bool) -> None:
        try:
            triton_io.send(sender, reply, final=final)
        except Exception as exc:  # noqa: BLE001 - the client is gone; nothing else to do for it
            triton_io.log_warn(f"vicuna_decoder: could not send a response: {exc!r}")
