"""The public event stream of one `minigpt5` request (docs/API.md, "Outputs").

stream=true: one response per event (`text`, `image_start`, `image`, `final`).
stream=false: everything is gathered and sent as one `complete` response (what `/generate` needs).
Events come from the request's thread and from image threads: a lock keeps `sequence_index` in
order (the ResponseWriter sends in FIFO order), and once the stream is closed (final or error)
nothing more is sent.
"""

from __future__ import annotations

import base64
import json
import threading

import numpy as np

from minigpt5_client.preprocess import encode_png

from . import triton_io


def png_base64(image: np.ndarray) -> str:
    return base64.b64encode(encode_png(image)).decode("ascii")


class AnswerStream:
    def __init__(self, post, stream: bool):
        self.post = post  # post(reply, final): hands a response to the ResponseWriter
        self.streaming = stream
        self._lock = threading.Lock()
        self._index = 0
        self._closed = False
        self.text = ""
        self._images: list[str] = []
        self._offsets: list[int] = []

    @property
    def closed(self) -> bool:
        return self._closed

    def text_delta(self, text: str) -> None:
        with self._lock:
            self.text += text
            if self.streaming:
                self._send("text", text)

    def image_start(self, offset: int) -> None:
        with self._lock:
            if self.streaming:
                self._send("image_start", "", offsets=[offset])

    def image(self, image: np.ndarray, offset: int) -> None:
        encoded = png_base64(image)  # outside the lock: PNG encoding takes a while for 512²
        with self._lock:
            self._images.append(encoded)
            self._offsets.append(offset)
            if self.streaming:
                self._send("image", "", images=[encoded], offsets=[offset])

    def finish(self, finish_reason: str, usage: dict) -> None:
        with self._lock:
            if self.streaming:
                self._send("final", "", finish_reason=finish_reason, usage=usage, final=True)
            else:
                self._send(
                    "complete",
                    self.text,
                    images=self._images,
                    offsets=self._offsets,
                    finish_reason=finish_reason,
                    usage=usage,
                    final=True,
                )

    def cancel(self) -> None:
        """The client went away: end the stream with the FINAL flag alone (Triton needs it even for
        a cancelled request) and send nothing more."""
        with self._lock:
            if not self._closed:
                self._closed = True
                self.post(None, True)

    def fail(self, exc: BaseException) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                self.post(triton_io.error_response(exc), True)

    def _send(
        self,
        event_type: str,
        text: str,
        *,
        images=None,
        offsets=None,
        finish_reason=None,
        usage=None,
        final: bool = False,
    ) -> None:
        if self._closed:
            return
        tensors = [
            triton_io.string_tensor("event_type", event_type),
            triton_io.tensor("sequence_index", np.array([self._index], dtype=np.int32)),
            triton_io.string_tensor("text_output", text),
        ]
        if images is not None:
            tensors.append(triton_io.string_tensor("image_output", images))
        if offsets is not None:
            tensors.append(triton_io.tensor("image_offset", np.array(offsets, dtype=np.int32)))
        if finish_reason is not None:
            tensors += [
                triton_io.string_tensor("finish_reason", finish_reason),
                triton_io.string_tensor("usage", json.dumps(usage)),
            ]
        self._index += 1
        self._closed = final
        self.post(triton_io.response(tensors), final)
