"""Single-threaded gateways for the BLS model's calls into Triton.

The `minigpt5` model funnels its calls into Triton through a few dedicated threads, which keeps
the stub's IPC orderly (many threads blocked in sends and BLS calls at once stalled 2.51's stub in
our tests) and lets the batched stages see real batches:
- `ResponseWriter`: every response to every client, in FIFO order (so per-request order holds);
- `BatchDispatcher`: calls to `vision_encoder` / `image_decoder`; jobs queued by any request
  thread go out together as one batched request (one call in flight per stage), which is also
  how the stages get real batches.
Each request thread reads its own decoder events (decoder_link.py) and hands what it answers to the writer.
"""

from __future__ import annotations

import concurrent.futures
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

_NOTHING = object()


class ResponseWriter:
    def __init__(self, send: Callable, on_error: Callable[[BaseException], None]):
        self._send = send
        self._on_error = on_error
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name="minigpt5-responses", daemon=True)
        self._thread.start()

    def put(self, sender, reply, final: bool) -> None:
        self._queue.put((sender, reply, final))

    def close(self, timeout: float = 10.0) -> None:
        self._queue.put(None)
        self._thread.join(timeout)

    def _loop(self) -> None:
        while (item := self._queue.get()) is not None:
            sender, reply, final = item
            try:
                self._send(sender, reply, final=final)
            except Exception as exc:  # noqa: BLE001 - a vanished client must not stop the writer
                self._on_error(exc)


class BatchDispatcher:
    """Queue jobs from any thread; one thread sends them in batches of up to `max_rows` rows.
    `on_call(waits, seconds)`, if given, hears of each successful call: each job's wait in the queue
    and the call's duration (metrics; it must not block)."""

    def __init__(
        self,
        name: str,
        call: Callable[[list], list],
        rows: Callable[[Any], int],
        max_rows: int,
        on_call: Callable[[list[float], float], None] | None = None,
    ):
        self._call = call
        self._rows = rows
        self._max_rows = max_rows
        self._on_call = on_call
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name=f"minigpt5-{name}", daemon=True)
        self._thread.start()

    def submit(self, job) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._queue.put((job, future, time.monotonic()))
        return future

    def close(self, timeout: float = 10.0) -> None:
        self._queue.put(None)
        self._thread.join(timeout)

    def _loop(self) -> None:
        carried: Any = _NOTHING
        while True:
            item = self._queue.get() if carried is _NOTHING else carried
            carried = _NOTHING
            if item is None:
                return
            batch, rows = [item], self._rows(item[0])
            while rows < self._max_rows:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None or rows + self._rows(nxt[0]) > self._max_rows:
                    carried = nxt
                    break
                batch.append(nxt)
                rows += self._rows(nxt[0])
            self._run(batch)

    def _run(self, batch: list) -> None:
        live = [(job, future, queued) for job, future, queued in batch if future.set_running_or_notify_cancel()]
        if not live:
            return
        started = time.monotonic()
        try:
            results = self._call([job for job, _, _ in live])
        except BaseException as exc:  # noqa: BLE001 - handed to every waiting request
            for _, future, _ in live:
                future.set_exception(exc)
            return
        if self._on_call:
            self._on_call([started - queued for _, _, queued in live], time.monotonic() - started)
        for (_, future, _), result in zip(live, results):
            future.set_result(result)
