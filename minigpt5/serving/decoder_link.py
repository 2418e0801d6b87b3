"""`minigpt5`'s end of the link to `vicuna_decoder`: one thread, one unary call per engine step.

Request threads `open` a DecodeStream and read its events; the link thread gathers what they ask for
(new requests, aborts) into the next call and files the call's events into the streams. While any
stream is open the thread calls again as soon as a call returns; the decoder answers each call when
a step has produced events for this link (or after its short wait), so events arrive about one step
after they were made and the engine never waits for the link. With nothing open the thread sleeps.

Triton-free: `call(link_id, commands, image_embeds) -> (events, voken_states)` is the BLS call,
given by the model (minigpt5_model.py), so the tests can drive the link without Triton.
"""

from __future__ import annotations

import queue
import threading
import time
import uuid
from collections.abc import Callable

import numpy as np

from ..engine import Finished, TextDelta
from ..errors import Overloaded
from ..sampling import SamplingParams
from .decoder_wire import Commands, Failure, NewRequest, decode_events, encode_commands

RETRY_PAUSE_S = 0.05  # after a failed call, before the next one (the decoder may be unloading)


class DecodeStream:
    """One request's decoder events in order: TextDelta and VokenStates, then one Finished.

    Text deltas queued behind one another come out as one, and `next_event(hold_text_until=...)`
    gathers text until then (a stream interval): a request that streams sends one response per
    interval instead of one per token, and one that fell behind catches up in one response."""

    def __init__(self, link: DecoderLink, request_id: str):
        self.request_id = request_id
        self._link = link
        self._events: queue.SimpleQueue = queue.SimpleQueue()
        self._held = None  # an event taken from the queue while merging text, not yet handed out
        self._not_text = threading.Event()  # set when an event other than text is put
        self._first_at: float | None = None  # time.monotonic() of the first event (the first token)
        self._finished_at: float | None = None  # ... and of the Finished event

    @property
    def decode_seconds(self) -> float | None:
        """From the first token's arrival to the Finished event's (metrics); None until both came."""
        if self._first_at is None or self._finished_at is None:
            return None
        return self._finished_at - self._first_at

    def next_event(self, timeout: float, hold_text_until: float = 0.0):
        """The next event, or None if none came within `timeout` seconds. Raises the request's error.
        Text is merged with the text queued behind it and, until `hold_text_until` (time.monotonic()),
        with text still to come, unless another event comes first."""
        event, self._held = self._held, None
        if event is None:
            try:
                event = self._events.get(timeout=max(timeout, 0.0))
            except queue.Empty:
                return None
        if isinstance(event, BaseException):
            raise event
        return self._merge_text(event, hold_text_until) if isinstance(event, TextDelta) else event

    def _merge_text(self, delta: TextDelta, hold_until: float) -> TextDelta:
        """`delta` and the text after it, until another event or `hold_until`. While holding, the thread
        sleeps until then or until a non-text event arrives, not once per token."""
        pieces = [delta.text]
        self._not_text.clear()  # anything put before this is found by the drain below
        self._drain_text(pieces)
        wait = hold_until - time.monotonic()
        if self._held is None and wait > 0:
            self._not_text.wait(wait)
            self._drain_text(pieces)
        return delta if len(pieces) == 1 else TextDelta(delta.request_id, "".join(pieces))

    def _drain_text(self, pieces: list[str]) -> None:
        """Queued text onto `pieces`, up to the first other event (held for the next call)."""
        while self._held is None:
            try:
                event = self._events.get_nowait()
            except queue.Empty:
                return
            if isinstance(event, TextDelta):
                pieces.append(event.text)
            else:
                self._held = event

    def abort(self) -> None:
        """Stop decoding this request: its row leaves the batch (and frees its KV cache) within a step or two."""
        self._link.abort(self.request_id)

    def put(self, event) -> None:
        now = time.monotonic()
        if isinstance(event, Finished):
            self._finished_at = now
        elif self._first_at is None:
            self._first_at = now
        self._events.put(event)
        if not isinstance(event, TextDelta):
            self._not_text.set()


class DecoderLink:
    def __init__(self, call: Callable[[str, str, np.ndarray | None], tuple[str, np.ndarray | None]]):
        self._call = call
        self.link_id = f"link-{uuid.uuid4().hex}"
        self._streams: dict[str, DecodeStream] = {}  # open: submitted and not finished
        self._pending = Commands()  # for the next call
        self._state = threading.Condition()  # guards _streams, _pending, _running
        self._running = True
        self._thread = threading.Thread(target=self._loop, name="minigpt5-decoder-link", daemon=True)
        self._thread.start()

    def open(
        self,
        request_id: str,
        prompt_ids: list[int],
        image_embeds: np.ndarray | None,
        sampling: SamplingParams,
        image_keys: list[str] | None = None,
    ) -> DecodeStream:
        """Queue a request for decoding; its events (or its refusal) come through the stream."""
        stream = DecodeStream(self, request_id)
        with self._state:
            if not self._running:
                raise Overloaded("model is unloading")
            self._streams[request_id] = stream
            self._pending.submit.append(NewRequest(request_id, list(prompt_ids), sampling, image_embeds, image_keys))
            self._state.notify()
        return stream

    def abort(self, request_id: str) -> None:
        """The stream gets nothing more; the decoder drops the row (or never sees a request not sent yet)."""
        with self._state:
            if self._streams.pop(request_id, None) is None:
                return  # finished already
            unsent = [r for r in self._pending.submit if r.request_id != request_id]
            if len(unsent) < len(self._pending.submit):
                self._pending.submit = unsent
            else:
                self._pending.abort.append(request_id)
                self._state.notify()

    def close(self, timeout: float = 10.0) -> None:
        """Stop the link thread; open streams get an UNAVAILABLE error."""
        with self._state:
            self._running = False
            streams, self._streams = self._streams, {}
            self._state.notify()
        self._thread.join(timeout)
        for stream in streams.values():
            stream.put(Overloaded("model is unloading"))

    @property
    def open_streams(self) -> int:
        with self._state:
            return len(self._streams)

    # ---- the link thread --------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._state:
                self._state.wait_for(lambda: not self._running or self._pending or self._streams)
                if not self._running:
                    return
                commands, self._pending = self._pending, Commands()
            try:
                events = decode_events(*self._call(self.link_id, *encode_commands(commands)))
            except Exception as exc:  # noqa: BLE001 - the decoder is gone or refused the call
                self._fail_open(exc)
                time.sleep(RETRY_PAUSE_S)
                continue
            for event in events:
                self._deliver(event)

    def _deliver(self, event) -> None:
        with self._state:
            ends = isinstance(event, (Finished, Failure))
            stream = self._streams.pop(event.request_id, None) if ends else self._streams.get(event.request_id)
        if stream is not None:
            stream.put(event.error if isinstance(event, Failure) else event)

    def _fail_open(self, exc: Exception) -> None:
        """A failed call: every open request ends with the error, and the decoder is asked to drop them."""
        error = exc if isinstance(exc, Overloaded) else RuntimeError(f"vicuna_decoder call failed: {exc}")
        with self._state:
            streams, self._streams = self._streams, {}
            self._pending.abort += list(streams)
        for stream in streams.values():
            stream.put(error)
