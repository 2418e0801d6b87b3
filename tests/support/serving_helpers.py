"""Raw protocol helpers for the serving tests: gRPC streaming, SSE and /generate, without the client
(only its wire contract)."""

from __future__ import annotations

import base64
import io
import json
import queue
import urllib.error
import urllib.request

import numpy as np
import tritonclient.grpc as grpcclient
from PIL import Image
from tritonclient.utils import np_to_triton_dtype

from minigpt5_client.contract import input_array


def grpc_inputs(params: dict) -> list:
    inputs = []
    for name, value in params.items():
        array = input_array(name, value)
        tensor = grpcclient.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


def grpc_stream(url: str, params: dict, timeout: float = 120.0) -> list[dict]:
    """All events of one request over gRPC streaming; raises InferenceServerException on error."""
    params = {"stream": True, **params}
    responses: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(url)
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    try:
        client.async_stream_infer("minigpt5", grpc_inputs(params), enable_empty_final_response=True)
        events = []
        while True:
            result, error = responses.get(timeout=timeout)
            if error is not None:
                raise error
            event = {}
            for output in result.get_response().outputs:
                array = result.as_numpy(output.name)
                event[output.name] = [v.decode() if isinstance(v, bytes) else v.item() for v in array.reshape(-1)]
            if event:
                events.append(event)
            final = result.get_response().parameters.get("triton_final_response")
            if final is not None and final.bool_param:
                return events
    finally:
        client.stop_stream()
        client.close()


def _post(url: str, path: str, body: dict, timeout: float):
    request = urllib.request.Request(
        f"http://{url}/v2/models/minigpt5/{path}",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    return urllib.request.urlopen(request, timeout=timeout)


def http_generate(url: str, body: dict, timeout: float = 120.0) -> dict:
    """POST /generate: one JSON object (status errors raise urllib.error.HTTPError)."""
    with _post(url, "generate", body, timeout) as reply:
        return json.loads(reply.read())


def sse_events(raw: bytes) -> list[dict]:
    events = []
    for line in raw.decode().splitlines():
        if line.startswith("data:"):
            events.append(json.loads(line[5:]))
    return events


def as_list(value) -> list:
    """Triton's JSON gives one-element outputs as a scalar and longer ones as a list."""
    if value is None:
        return []
    return value if isinstance(value, list) else [value]


def decode_png(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


def assemble(events: list[dict]) -> dict:
    """Streamed events (gRPC lists or SSE scalars) → text, images, offsets, finish, usage."""
    text, images, offsets, finish, usage = "", [], [], None, None
    for event in events:
        kind = as_list(event.get("event_type"))[0]
        text += "".join(as_list(event.get("text_output")))
        if kind in ("image", "complete"):
            images += [decode_png(b) for b in as_list(event.get("image_output"))]
            offsets += as_list(event.get("image_offset"))
        if kind in ("final", "complete"):
            finish = as_list(event.get("finish_reason"))[0]
            usage = json.loads(as_list(event.get("usage"))[0])
    return {"text": text, "images": images, "offsets": offsets, "finish_reason": finish, "usage": usage}
