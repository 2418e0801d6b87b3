"""The continuous-batching decoder inside the public `minigpt5` model's process.

One engine thread runs `DecodeEngine.step()` while there is work and puts each event on the queue of
the request it belongs to; that request's own thread (bls_model.py) reads its queue, so the decode
loop never waits on Triton IPC. This is vllm_backend's layout: the engine lives in the process of the
model that streams the answer.

Why not a separate `vicuna_decoder` model behind BLS: the answer has to stream, which needs a
decoupled BLS call per request, and with Triton 2.51's python backend several decoupled BLS streams
at once hang or corrupt the calling stub's heap (docs/RELIABILITY.md, "Why the decoder runs in the
public model"). Unary BLS calls, used for the vision encoder and the image decoder, do not.
"""
from __future__ import annotations

import queue
import threading

from ..engine import AdmissionError, Finished, TextDelta
from ..errors import InvalidRequest, Overloaded
from ..sampling import SamplingParams
from ..stages import DecoderStage

IDLE_WAIT_S = 0.5  # the engine thread re-checks for shutdown at least this often when idle


class DecodeStream:
    """One request's decoder events in order: TextDelta and VokenStates, then one Finished.

    Text deltas already queued behind one another come out as one: a request thread that fell behind
    the engine (a loaded server) catches up with one response instead of one per token, and a
    thread that keeps up sees every token as it comes."""

    def __init__(self, host: "DecoderHost", request_id: str):
        self.request_id = request_id
        self._host = host
        self._events: queue.SimpleQueue = queue.SimpleQueue()
        self._held = None  # an event taken from the queue while merging text, not yet handed out

    def next_event(self, timeout: float):
        """The next event, or None if none came within `timeout` seconds. Raises what broke the engine step."""
        event, self._held = self._held, None
        if event is None:
            try:
                event = self._events.get(timeout=max(timeout, 0.0))
            except queue.Empty:
                return None
        if isinstance(event, BaseException):
            raise event
        return self._merge_text(event) if isinstance(event, TextDelta) else event

    def _merge_text(self, delta: TextDelta) -> TextDelta:
        pieces = [delta.text]
        while self._held is None:
            try:
                event = self._events.get_nowait()
            except queue.Empty:
                break
            if isinstance(event, TextDelta):
                pieces.append(event.text)
            else:
                self._held = event
        return delta if len(pieces) == 1 else TextDelta(delta.request_id, "".join(pieces))

    def abort(self) -> None:
        """Stop decoding this request: its row leaves the batch (and frees its KV cache) at the next step."""
        self._host.abort(self.request_id)

    def put(self, event) -> None:
        self._events.put(event)


class DecoderHost:
    """Owns the DecodeEngine and its thread; hands out one DecodeStream per request."""

    def __init__(self, stage: DecoderStage, observe_batch=None):
        self.stage = stage
        self.engine = stage.engine
        self._observe_batch = observe_batch  # called with the rows of each step (a metric)
        self._streams: dict[str, DecodeStream] = {}
        self._streams_lock = threading.Lock()
        self._work = threading.Condition()
        self._running = True
        self.stage.warmup()  # before the engine thread exists: warmup drives the engine itself
        self._thread = threading.Thread(target=self._loop, name="minigpt5-engine", daemon=True)
        self._thread.start()

    def open(self, request_id: str, prompt_ids: list[int], image_embeds, sampling: SamplingParams) -> DecodeStream:
        """Queue a request for decoding. Raises InvalidRequest if it can never fit (context, KV budget)."""
        decode_request = self.stage.make_request(request_id, prompt_ids, image_embeds, sampling)
        stream = DecodeStream(self, request_id)
        with self._streams_lock:
            if not self._running:
                raise Overloaded("model is unloading")
            self._streams[request_id] = stream
        try:
            self.engine.submit(decode_request)
        except AdmissionError as exc:
            self._pop(request_id)
            raise InvalidRequest(str(exc)) from None
        self._wake()
        return stream

    def abort(self, request_id: str) -> None:
        self._pop(request_id)  # its remaining events, the final "aborted" included, go nowhere
        self.engine.abort(request_id)
        self._wake()

    def close(self, timeout: float = 30.0) -> None:
        """Stop the engine thread; requests still open get an UNAVAILABLE error."""
        with self._streams_lock:
            self._running = False
            streams, self._streams = self._streams, {}
        self._wake()
        self._thread.join(timeout)
        for stream in streams.values():
            stream.put(Overloaded("model is unloading"))

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
                self._fail_running(exc)
                continue
            if self._observe_batch and self.engine.rows:
                self._observe_batch(len(self.engine.rows))
            for event in events:
                self._deliver(event)

    def _deliver(self, event) -> None:
        if isinstance(event, Finished):
            stream = self._pop(event.request_id)
        else:
            with self._streams_lock:
                stream = self._streams.get(event.request_id)
        if stream is not None:
            stream.put(event)

    def _fail_running(self, exc: Exception) -> None:
        failure = RuntimeError(f"decoder step failed: {exc!r}")
        for request_id in self.engine.drop_running():
            if (stream := self._pop(request_id)) is not None:
                stream.put(failure)

    def _pop(self, request_id: str) -> DecodeStream | None:
        with self._streams_lock:
            return self._streams.pop(request_id, None)

    def _wake(self) -> None:
        with self._work:
            self._work.notify()
