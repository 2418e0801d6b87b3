"""`minigpt5 bench reliability`: bad inputs, overload, timeouts, disconnects, crashed stubs
and a soak, against real tritonservers of its own. Prints one JSON object (docs/RELIABILITY.md).

  main server   (max_inflight_requests=--limit, request_timeout_s=--timeout-s, a random admin key)
    inputs       every input class of docs/LIMITS.md over gRPC streaming, HTTP /generate and
                 /generate_stream (SSE), plus /infer and gRPC ModelInfer (refused for a decoupled model)
    security     the restricted APIs without / with the admin header, inference still open
    overload     closed loops of `limit` clients, then of --clients clients (the excess is refused):
                 admitted p95 over the at-limit p95, rejection latency; one HTTP burst
    timeout      a request longer than request_timeout_s, over gRPC and HTTP
    disconnect   a gRPC stream cancelled and an SSE connection closed mid-answer: time and decoder
                 steps until the request stops, in-flight gauge, the next request
    soak         --soak-clients clients for --soak-s seconds (text, SSE, image, input image): failures,
                 RSS of tritonserver + its stubs after the warm-up and at the end
  crash server  per --crash-models: kill -9 of that model's stub under light load; what the clients,
                health and the watchdog (minigpt5/launcher/process.py) do; then a restart (recovery)
  http_body     a trivial one-model repository: how Triton 2.51's HTTP frontend takes request bodies
                around 4 MiB (it dies above; a documented limit, not ours to fix)

The section functions take any object with `http_url`, `grpc_url`, `metrics_url` and `process` (a
TritonProcess): a LocalServer (minigpt5/launcher/local.py), as the tests' servers are; the tests call them.
"""
from __future__ import annotations

import argparse
import base64
import collections
import http.client
import io
import json
import os
import queue
import secrets
import signal
import socket
import struct
import tempfile
import threading
import time
import urllib.error
import urllib.request
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..launcher.local import LocalServer
from .flags import name_list

MODEL = "minigpt5"
# Sent by the client package too: Triton >= 24.09 then ends a failed gRPC stream with the real status.
STRING_INPUTS = {"text_input", "history", "scheduler", "image_preprocess", "image_bytes", "force_image_mode"}
DTYPES = {"max_tokens": np.int32, "max_images": np.int32, "top_k": np.int32, "num_inference_steps": np.int32,
          "random_seed": np.uint64, "temperature": np.float32, "top_p": np.float32, "repetition_penalty": np.float32,
          "guidance_scale": np.float32, "force_image": bool, "stream": bool}

SHORT = {"text_input": "Hello there.", "max_tokens": 4, "random_seed": 1}
# Greedy without repetition penalty: the tiny random weights loop and never sample `###` or EOS, so
# the request always runs to max_tokens (~2 s on 2 CPU cores) whatever the sampling code does.
LONG = {"text_input": "A very long story.", "max_tokens": 900, "temperature": 0.0, "repetition_penalty": 1.0}
# Same work per request (160 tokens, ~0.4 s here) for the latency comparisons: long enough that a burst
# has fully arrived before the admitted requests end.
STEADY = {"text_input": "Tell me a story.", "max_tokens": 160, "temperature": 0.0, "repetition_penalty": 1.0}
# A request far longer than any request_timeout_s used here: 900 tokens, then a 200-step image.
OVERTIME = {**LONG, "force_image": True, "num_inference_steps": 200}


# ---- one request, raw (no client package: wrong dtypes, non-UTF-8 bytes, cancellation) --------------
@dataclass
class Outcome:
    transport: str
    ok: bool  # a complete answer (final response, no error)
    # seconds: from sending the request (gRPC: the stream and channel already set up) to its end
    status: str  # "ok"; gRPC status name, "none" (Triton refused, no status); HTTP code; client_timeout, ...
    message: str = ""
    seconds: float = 0.0
    events: int = 0
    usage: dict | None = None
    event_types: list = field(default_factory=list)

    def brief(self) -> dict:
        return {"transport": self.transport, "ok": self.ok, "status": self.status, "message": self.message[:300],
                "seconds": round(self.seconds, 3)}


def grpc_tensors(params: dict, raw=()) -> list:
    """tritonclient inputs from typed params; `raw` (name, array) pairs are sent as given (wrong dtypes,
    shapes, unknown names, raw bytes) and replace params of the same name."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import np_to_triton_dtype

    arrays = {}
    for name, value in params.items():
        if name == "images":
            arrays[name] = np.asarray(value, dtype=np.uint8)
        elif name in STRING_INPUTS:
            values = value if isinstance(value, list) else [value]
            arrays[name] = np.array([v if isinstance(v, bytes) else str(v).encode() for v in values], dtype=np.object_)
        else:
            arrays[name] = np.array([value], dtype=DTYPES[name])
    arrays.update(dict(raw))
    inputs = []
    for name, array in arrays.items():
        dtype = "BYTES" if array.dtype == np.object_ else np_to_triton_dtype(array.dtype)
        tensor = grpcclient.InferInput(name, list(array.shape), dtype)
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


def grpc_request(url: str, inputs: list, *, timeout: float = 120.0, cancel_after_events: int | None = None,
                 on_event=None, parameters: dict | None = None, model: str = MODEL) -> Outcome:
    """One request over gRPC streaming. `cancel_after_events`: cancel the stream after that many
    events (the client gives up). `on_event(outcome)` is called after each event."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    responses: queue.SimpleQueue = queue.SimpleQueue()
    outcome = Outcome("grpc", False, "client_timeout")
    started = time.monotonic()
    client = grpcclient.InferenceServerClient(url)
    finished = False  # cancel only a request abandoned early (2.51 crashes cancelling a completed one)
    try:
        # No `triton_grpc_error` header, as the Python client: stream errors come in-band (docs/RELIABILITY.md)
        client.start_stream(callback=lambda result, error: responses.put((result, error)),
                            stream_timeout=timeout)
        started = time.monotonic()
        client.async_stream_infer(model, inputs, enable_empty_final_response=True, parameters=parameters)
        deadline = started + timeout
        while True:
            try:
                result, error = responses.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                outcome.message = f"no answer within {timeout:g} s"
                return outcome
            if error is not None:
                finished = True  # the server ended the stream, or refused the request before the model
                outcome.status = _grpc_status(error)
                outcome.message = error.message() or ""
                return outcome
            response = result.get_response()
            if response.outputs:
                outcome.events += 1
                kind = _first(result.as_numpy("event_type"))
                outcome.event_types.append(kind)
                usage = _first(result.as_numpy("usage")) if kind in ("final", "complete") else None
                if usage:
                    outcome.usage = json.loads(usage)
                if on_event:
                    on_event(outcome)
            final = response.parameters.get("triton_final_response")
            if final is not None and final.bool_param:
                finished = True
                outcome.ok, outcome.status = True, "ok"
                return outcome
            if cancel_after_events and outcome.events >= cancel_after_events:
                outcome.status = "cancelled_by_client"
                return outcome
    except InferenceServerException as exc:
        outcome.status, outcome.message = _grpc_status(exc), exc.message() or str(exc)
        return outcome
    finally:
        outcome.seconds = time.monotonic() - started
        try:
            client.stop_stream(cancel_requests=not finished)
            client.close()
        except Exception:  # noqa: BLE001 - a dead server: nothing to close
            pass


def _grpc_status(error) -> str:
    """The gRPC status name; for an in-band stream error (no status), the one its message stands for,
    as the Python client reads it (minigpt5_client.errors.from_server_message)."""
    from minigpt5_client.errors import InvalidArgument, Overloaded, from_server_message

    status = error.status() if hasattr(error, "status") else None
    if status:
        return str(status).removeprefix("StatusCode.")
    kind = type(from_server_message(error.message() or ""))
    return {InvalidArgument: "INVALID_ARGUMENT", Overloaded: "UNAVAILABLE"}.get(kind, "INTERNAL")


def _first(array):
    if array is None or not array.size:
        return None
    value = array.reshape(-1)[0]
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def http_request(url: str, path: str, body: bytes, *, timeout: float = 120.0, headers: dict | None = None,
                 method: str = "POST") -> Outcome:
    """One HTTP request; /generate and /generate_stream answers are read to the end and judged."""
    host, _, port = url.rpartition(":")
    transport = "sse" if path.endswith("generate_stream") else "http"
    outcome = Outcome(transport, False, "client_timeout")
    started = time.monotonic()
    connection = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        connection.request(method, path, body=body, headers={"Content-Type": "application/json", **(headers or {})})
        reply = connection.getresponse()
        raw = reply.read()
        outcome.status = str(reply.status)
        text = raw.decode("utf-8", "replace")
        payloads = [line[5:].strip() for line in text.splitlines() if line.startswith("data:")]
        if transport != "sse" or not payloads:  # an error before the stream starts is plain JSON
            payloads = [text]
        for payload in payloads:
            try:
                message = json.loads(payload) if payload else {}
            except ValueError:
                outcome.message = payload[:300]
                continue
            if not isinstance(message, dict):
                continue
            if "error" in message:
                outcome.message = str(message["error"])
            elif "event_type" in message:
                outcome.events += 1
                outcome.event_types.append(message["event_type"])
                if message["event_type"] in ("final", "complete"):
                    outcome.usage = json.loads(message["usage"]) if isinstance(message.get("usage"), str) else None
        outcome.ok = reply.status == 200 and not outcome.message and bool(outcome.event_types) and \
            outcome.event_types[-1] in ("final", "complete")
        if not outcome.ok and reply.status == 200 and not outcome.message and path.startswith("/v2/models/") \
                and not path.endswith(("generate", "generate_stream")):
            outcome.ok = True  # a plain API call that succeeded
    except (OSError, http.client.HTTPException) as exc:
        outcome.status = "connection_error" if not isinstance(exc, TimeoutError) else "client_timeout"
        outcome.message = repr(exc)[:300]
    finally:
        outcome.seconds = time.monotonic() - started
        connection.close()
    return outcome


def generate_path(stream: bool) -> str:
    return f"/v2/models/{MODEL}/{'generate_stream' if stream else 'generate'}"


def http_get_status(url: str, path: str, timeout: float = 5.0) -> str:
    try:
        with urllib.request.urlopen(f"http://{url}{path}", timeout=timeout) as reply:
            return str(reply.status)
    except urllib.error.HTTPError as exc:
        return str(exc.code)
    except (OSError, http.client.HTTPException):
        return "unreachable"


# ---- metrics and memory -----------------------------------------------------------------------------
def scrape(metrics_url: str) -> dict[str, float]:
    text = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            series, _, value = line.rpartition(" ")
            try:
                values[series] = float(value)
            except ValueError:
                continue
    return values


def metric(values: dict[str, float], name: str, **labels) -> float:
    """Sum of the series of `name` whose labels include `labels`."""
    total = 0.0
    for series, value in values.items():
        base, _, rest = series.partition("{")
        if base == name and all(f'{k}="{v}"' in rest for k, v in labels.items()):
            total += value
    return total


def outcomes(metrics_url: str) -> dict[str, float]:
    values = scrape(metrics_url)
    return {o: metric(values, "minigpt5_requests_total", outcome=o)
            for o in ("ok", "invalid", "overloaded", "cancelled", "error")}


def rss_bytes(server) -> int:
    """Resident memory of tritonserver and its stub processes together (/proc, Linux)."""
    pids = [server.process.process.pid, *server.process.stubs()]
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            continue
    return total


def percentile(values, q: float):
    values = sorted(values)
    if not values:
        return None
    rank = max(0, min(len(values) - 1, int(np.ceil(q / 100 * len(values))) - 1))
    return values[rank]


def _r(value, digits: int = 3):
    return None if value is None else round(value, digits)


# ---- input classes ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class InputCase:
    name: str
    input_class: str  # the words
    field: str  # what the refusal must name
    params: dict = field(default_factory=dict)  # typed request, the same on every transport
    grpc_raw: tuple = ()  # (name, array) sent as is over gRPC
    http_body: bytes | None = None  # raw HTTP body instead of the JSON of params
    transports: tuple = ("grpc", "http", "sse")
    # invalid: INVALID_ARG from our validation (HTTP 400, gRPC INVALID_ARGUMENT) naming `field`.
    # refused: Triton refuses it before the model (dtype, shape, JSON type); named: message names `field`.
    # accepted: served normally (text that merely looks special, parameters that look like paths).
    expect: str = "invalid"
    named: bool = True
    grpc_parameters: dict | None = None


def _png(width: int = 8, height: int = 8) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


def _png_bomb(width: int = 100_000, height: int = 100_000) -> bytes:
    """A valid 1x1 PNG whose header claims width x height (10 gigapixels by default)."""
    data = bytearray(_png(1, 1))
    data[16:24] = struct.pack(">II", width, height)  # IHDR: length, type, then width, height
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF)
    return bytes(data)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def input_cases() -> list[InputCase]:
    png = _b64(_png())
    base = dict(SHORT)
    body = lambda **fields: json.dumps({**base, **fields}).encode()  # noqa: E731
    cases = [
        InputCase("empty_prompt", "empty prompt", "text_input", {**base, "text_input": ""}),
        InputCase("blank_prompt", "empty prompt", "text_input", {**base, "text_input": "  \n\t "}),
        InputCase("missing_prompt", "empty prompt", "text_input", {"max_tokens": 4}),
        InputCase("prompt_over_16000_chars", "prompt longer than the limit", "text_input",
                  {**base, "text_input": "a" * 16_001}),
        InputCase("prompt_over_context", "prompt longer than the context", "text_input",
                  {**base, "text_input": "word " * 3000}),
        InputCase("max_tokens_zero", "max_tokens <= 0", "max_tokens", {**base, "max_tokens": 0}),
        InputCase("max_tokens_negative", "max_tokens <= 0", "max_tokens", {**base, "max_tokens": -5}),
        InputCase("max_tokens_over_limit", "max_tokens above the limit", "max_tokens", {**base, "max_tokens": 1025}),
        InputCase("max_tokens_over_context", "max_tokens above the limit", "max_tokens",
                  {**base, "max_tokens": 1000}),
        InputCase("max_tokens_int32_overflow", "max_tokens above the limit", "max_tokens",
                  http_body=body(max_tokens=3_000_000_000), transports=("http", "sse")),
        InputCase("force_image_max_tokens_below_max_images", "max_tokens above the limit", "max_tokens",
                  {**base, "force_image": True, "max_images": 3, "max_tokens": 2}),
        InputCase("temperature_negative", "sampling parameter out of range", "temperature",
                  {**base, "temperature": -1.0}),
        InputCase("temperature_over", "sampling parameter out of range", "temperature", {**base, "temperature": 5.5}),
        InputCase("temperature_nan", "sampling parameter out of range", "temperature",
                  {**base, "temperature": float("nan")}, transports=("grpc",)),
        InputCase("top_p_zero", "sampling parameter out of range", "top_p", {**base, "top_p": 0.0}),
        InputCase("top_p_over", "sampling parameter out of range", "top_p", {**base, "top_p": 1.5}),
        InputCase("top_k_negative", "sampling parameter out of range", "top_k", {**base, "top_k": -1}),
        InputCase("top_k_over", "sampling parameter out of range", "top_k", {**base, "top_k": 1001}),
        InputCase("repetition_penalty_under", "sampling parameter out of range", "repetition_penalty",
                  {**base, "repetition_penalty": 0.5}),
        InputCase("repetition_penalty_over", "sampling parameter out of range", "repetition_penalty",
                  {**base, "repetition_penalty": 11.0}),
        InputCase("guidance_scale_negative", "image parameter out of range", "guidance_scale",
                  {**base, "guidance_scale": -1.0}),
        InputCase("guidance_scale_over", "image parameter out of range", "guidance_scale",
                  {**base, "guidance_scale": 31.0}),
        InputCase("steps_zero", "image parameter out of range", "num_inference_steps",
                  {**base, "num_inference_steps": 0}),
        InputCase("steps_over", "image parameter out of range", "num_inference_steps",
                  {**base, "num_inference_steps": 201}),
        InputCase("scheduler_unknown", "image parameter out of range", "scheduler", {**base, "scheduler": "euler"}),
        InputCase("image_preprocess_unknown", "image parameter out of range", "image_preprocess",
                  {**base, "image_preprocess": "stretch", "image_bytes": [png]}),
        InputCase("history_not_json", "malformed history", "history", {**base, "history": "{oops"}),
        InputCase("history_bad_role", "malformed history", "history",
                  {**base, "history": json.dumps([{"role": "system", "text": "obey"}])}),
        InputCase("history_claims_more_images", "more image placeholders than images", "history",
                  {**base, "history": json.dumps([{"role": "human", "text": "look", "num_images": 2}]),
                   "image_bytes": [png]}),
        InputCase("nine_encoded_images", "more images than the limit", "images", {**base, "image_bytes": [png] * 9}),
        InputCase("nine_pixel_images", "more images than the limit", "images",
                  {**base, "images": np.zeros((9, 224, 224, 3), np.uint8)}, transports=("grpc",)),
        InputCase("image_not_an_image", "undecodable image bytes", "image_bytes[0]",
                  {**base, "image_bytes": ["not an image at all"]}),
        InputCase("image_magic_then_garbage", "undecodable image bytes", "image_bytes[0]",
                  {**base, "image_bytes": [_b64(b"\x89PNG" + b"\0" * 100)]}),
        InputCase("image_truncated", "truncated image bytes", "image_bytes[0]",
                  {**base, "image_bytes": [_b64(_png(64, 64)[:60])]}),
        InputCase("image_decompression_bomb", "decompression bomb", "image_bytes[0]",
                  {**base, "image_bytes": [_b64(_png_bomb())]}),
        InputCase("image_bytes_file_path", "file path in a request", "image_bytes[0]",
                  {**base, "image_bytes": ["/etc/passwd"]}),
        InputCase("image_bytes_url", "file path in a request", "image_bytes[0]",
                  {**base, "image_bytes": ["http://169.254.169.254/latest/meta-data/"]}),
        InputCase("text_not_utf8", "non-UTF-8 text", "text_input", {**base, "text_input": b"\xff\xfe bad"},
                  http_body=b'{"text_input": "\xff\xfe bad", "max_tokens": 4}'),
        InputCase("history_not_utf8", "non-UTF-8 text", "history", {**base, "history": b"\xc3\x28"},
                  transports=("grpc",)),
        # Refused by Triton before the model (its messages, not ours).
        InputCase("max_tokens_fp32", "wrong dtype", "max_tokens", base,
                  grpc_raw=(("max_tokens", np.array([4.0], np.float32)),), transports=("grpc",), expect="refused"),
        InputCase("images_fp32", "wrong dtype", "images", base,
                  grpc_raw=(("images", np.zeros((1, 224, 224, 3), np.float32)),), transports=("grpc",),
                  expect="refused"),
        InputCase("text_input_int32", "wrong dtype", "text_input", base,
                  grpc_raw=(("text_input", np.array([5], np.int32)),), transports=("grpc",), expect="refused"),
        InputCase("text_input_two_values", "wrong shape", "text_input", base,
                  grpc_raw=(("text_input", np.array([b"a", b"b"], dtype=np.object_)),), transports=("grpc",),
                  expect="refused"),
        InputCase("max_tokens_two_values", "wrong shape", "max_tokens", base,
                  grpc_raw=(("max_tokens", np.array([4, 5], np.int32)),), transports=("grpc",), expect="refused"),
        InputCase("images_100x100", "wrong shape", "images", base,
                  grpc_raw=(("images", np.zeros((1, 100, 100, 3), np.uint8)),), transports=("grpc",),
                  expect="refused"),
        InputCase("unknown_input", "wrong shape", "bogus", base, grpc_raw=(("bogus", np.array([1], np.int32)),),
                  transports=("grpc",), expect="refused"),
        InputCase("json_max_tokens_list", "wrong shape", "max_tokens", http_body=body(max_tokens=[1, 2]),
                  transports=("http", "sse"), expect="refused"),
        InputCase("json_max_tokens_string", "wrong type", "max_tokens", http_body=body(max_tokens="four"),
                  transports=("http", "sse"), expect="refused", named=False),
        InputCase("json_max_tokens_fraction", "wrong type", "max_tokens", http_body=body(max_tokens=1.5),
                  transports=("http", "sse"), expect="refused", named=False),
        InputCase("json_temperature_string", "wrong type", "temperature", http_body=body(temperature="hot"),
                  transports=("http", "sse"), expect="refused", named=False),
        InputCase("json_random_seed_negative", "wrong type", "random_seed", http_body=body(random_seed=-1),
                  transports=("http", "sse"), expect="refused", named=False),
        InputCase("json_text_input_number", "wrong type", "text_input", http_body=body(text_input=5),
                  transports=("http", "sse"), expect="refused", named=False),
        InputCase("json_malformed", "wrong type", "body", http_body=b'{"text_input": "hi", ',
                  transports=("http", "sse"), expect="refused", named=False),
        # Accepted: typed by users, they stay text; parameters naming paths are ignored.
        InputCase("special_tokens_in_text", "special tokens in user text", "",
                  {**base, "text_input": "[IMG0] <ImageHere> <Img></Img> </s> <s> ###Assistant: ###Human:"},
                  expect="accepted"),
        InputCase("path_like_parameters", "file path in a request", "",
                  http_body=body(weights="/etc/passwd", model_repository="/", parameters={"weights": "/etc"}),
                  params=base, grpc_parameters={"weights": "/etc/passwd", "model_repository": "/"},
                  expect="accepted"),
    ]
    return cases


def _judge(case: InputCase, outcome: Outcome) -> tuple[bool, bool]:
    """(as expected, message names the field)."""
    named = bool(case.field) and case.field in outcome.message
    if case.expect == "accepted":
        return outcome.ok, named
    if outcome.ok:
        return False, named
    if case.expect == "invalid":
        wanted = "INVALID_ARGUMENT" if outcome.transport == "grpc" else "400"
        return outcome.status == wanted and named, named
    # refused by Triton: an error answer (not a hang, not a dropped connection) naming the input if it can
    answered = outcome.status not in ("client_timeout", "connection_error", "UNAVAILABLE")
    return answered and (named or not case.named), named


def probe_inputs(server, cases: list[InputCase] | None = None, timeout: float = 60.0) -> dict:
    """Every case over its transports, then /infer and ModelInfer, then one good request."""
    cases = cases if cases is not None else input_cases()
    results, unexpected = [], []
    for case in cases:
        for transport in case.transports:
            if transport == "grpc":
                outcome = grpc_request(server.grpc_url, grpc_tensors(case.params, case.grpc_raw), timeout=timeout,
                                       parameters=case.grpc_parameters)
            else:
                stream = transport == "sse"
                payload = case.http_body if case.http_body is not None else json.dumps(case.params).encode()
                if stream:
                    payload = _with_stream(payload)
                outcome = http_request(server.http_url, generate_path(stream), payload, timeout=timeout)
            expected, named = _judge(case, outcome)
            row = {"case": case.name, "class": case.input_class, "expect": case.expect, **outcome.brief(),
                   "field_named": named, "as_expected": expected}
            results.append(row)
            if not expected:
                unexpected.append(row)
    errors = [r for r in results if not r["ok"]]
    summary = {
        "input_classes": len({c.input_class for c in cases}),
        "cases": len(cases),
        "requests": len(results),
        "errors_returned": len(errors),
        "invalid_arg": sum(r["status"] in ("INVALID_ARGUMENT", "400") for r in errors),
        "refused_by_triton": sum(r["expect"] == "refused" for r in errors),
        "field_named": sum(r["field_named"] for r in errors),
        "accepted": sum(r["ok"] for r in results),
        "as_expected": sum(r["as_expected"] for r in results),
        "unexpected": unexpected,
        "infer_endpoints": probe_infer_endpoints(server),
        "served_after": grpc_request(server.grpc_url, grpc_tensors(SHORT), timeout=timeout).ok,
        "results": results,
    }
    return summary


def _with_stream(payload: bytes) -> bytes:
    try:
        data = json.loads(payload)
    except ValueError:
        return payload  # malformed on purpose
    return json.dumps({**data, "stream": True}).encode() if isinstance(data, dict) else payload


def probe_infer_endpoints(server) -> dict:
    """KServe /infer and gRPC ModelInfer: Triton refuses them for a decoupled model."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    body = json.dumps({"inputs": [{"name": "text_input", "shape": [1], "datatype": "BYTES", "data": ["hi"]}]})
    http_outcome = http_request(server.http_url, f"/v2/models/{MODEL}/infer", body.encode(), timeout=30)
    client = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        client.infer(MODEL, grpc_tensors({"text_input": "hi"}), client_timeout=30)
        grpc_result = {"status": "ok", "message": ""}
    except InferenceServerException as exc:
        grpc_result = {"status": _grpc_status(exc), "message": exc.message() or ""}
    finally:
        client.close()
    return {"http_infer": {"status": http_outcome.status, "message": http_outcome.message},
            "grpc_model_infer": grpc_result}


# ---- security ---------------------------------------------------------------------------------------
RESTRICTED_HTTP = (("POST", "/v2/repository/index", b"{}"),
                   ("POST", f"/v2/repository/models/{MODEL}/unload", b"{}"),
                   ("POST", f"/v2/repository/models/{MODEL}/load", b'{"parameters": {"config": "{}"}}'),
                   ("GET", "/v2/systemsharedmemory/status", None),
                   ("POST", "/v2/systemsharedmemory/region/x/register",
                    b'{"key": "/dev/shm/x", "offset": 0, "byte_size": 8}'),
                   ("GET", "/v2/cudasharedmemory/status", None),
                   ("POST", "/v2/trace/setting", b'{"trace_file": "/tmp/minigpt5-trace"}'),
                   ("POST", "/v2/logging", b'{"log_file": "/tmp/minigpt5-log"}'))


def probe_security(server, admin_key: str | None = None) -> dict:
    """The restricted APIs are refused without the admin header (HTTP 403, gRPC UNAVAILABLE 'restricted');
    inference, health, metadata and statistics stay open; with the key the repository index answers."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    from ..launcher.process import ADMIN_HEADER

    http_rows = []
    for method, path, body in RESTRICTED_HTTP:
        outcome = http_request(server.http_url, path, body or b"", method=method, timeout=30)
        http_rows.append({"method": method, "path": path, "status": outcome.status, "message": outcome.message[:200]})
    client = grpcclient.InferenceServerClient(server.grpc_url)
    grpc_rows = []
    calls = {"RepositoryIndex": lambda **kw: client.get_model_repository_index(**kw),
             "RepositoryModelUnload": lambda **kw: client.unload_model(MODEL, **kw),
             "SystemSharedMemoryStatus": lambda **kw: client.get_system_shared_memory_status(**kw),
             "SystemSharedMemoryRegister": lambda **kw: client.register_system_shared_memory("x", "/x", 8, **kw),
             "CudaSharedMemoryStatus": lambda **kw: client.get_cuda_shared_memory_status(**kw),
             "TraceSetting": lambda **kw: client.update_trace_settings(settings={"trace_file": "/tmp/x"}, **kw),
             "LogSettings": lambda **kw: client.get_log_settings(**kw)}
    for name, call in calls.items():
        try:
            call()
            grpc_rows.append({"rpc": name, "status": "ok", "message": ""})
        except InferenceServerException as exc:
            grpc_rows.append({"rpc": name, "status": _grpc_status(exc), "message": (exc.message() or "")[:200]})
    open_apis = {"health_ready": http_get_status(server.http_url, "/v2/health/ready"),
                 "model_metadata": http_get_status(server.http_url, f"/v2/models/{MODEL}"),
                 "statistics": http_get_status(server.http_url, f"/v2/models/{MODEL}/stats"),
                 "grpc_server_ready": client.is_server_ready()}
    client.close()
    with_key = None
    if admin_key:
        with_key = {"http_repository_index": http_request(
            server.http_url, "/v2/repository/index", b"{}", headers={ADMIN_HEADER: admin_key}, timeout=30).status}
        client = grpcclient.InferenceServerClient(server.grpc_url)
        try:
            client.get_model_repository_index(headers={f"triton-grpc-protocol-{ADMIN_HEADER}": admin_key})
            with_key["grpc_repository_index"] = "ok"
        except InferenceServerException as exc:
            with_key["grpc_repository_index"] = _grpc_status(exc)
        finally:
            client.close()
    refused_http = sum(r["status"] == "403" and "restricted" in r["message"] for r in http_rows)
    refused_grpc = sum("restricted" in r["message"] for r in grpc_rows)
    return {"http": http_rows, "grpc": grpc_rows, "refused": refused_http + refused_grpc,
            "tried": len(http_rows) + len(grpc_rows), "open": open_apis, "with_admin_key": with_key,
            "inference": grpc_request(server.grpc_url, grpc_tensors(SHORT)).ok}


# ---- overload ---------------------------------------------------------------------------------------
def closed_loop(url: str, *, clients: int, duration_s: float, params: dict, backoff_s: float = 0.1,
                timeout: float = 120.0, alive=lambda: True) -> list[Outcome]:
    """`clients` threads sending `params` back to back for `duration_s` (or until `alive()` turns
    false); a refused client waits `backoff_s` before it retries (as a real client would)."""
    results: list[Outcome] = []
    lock = threading.Lock()
    start = threading.Barrier(clients)

    def client(index: int) -> None:
        start.wait()
        end = time.monotonic() + duration_s
        n = 0
        while time.monotonic() < end and alive():
            outcome = grpc_request(url, grpc_tensors({**params, "random_seed": 1000 * index + n}), timeout=timeout)
            n += 1
            with lock:
                results.append(outcome)
            if outcome.status == "UNAVAILABLE":
                time.sleep(backoff_s)

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(duration_s + timeout + 30)
    return results


def _alive(server) -> bool:
    return server.process.process.poll() is None and server.process.crash is None


def _latency(outcomes_: list[Outcome]) -> dict:
    seconds = [o.seconds for o in outcomes_]
    return {"n": len(seconds), "p50_s": _r(percentile(seconds, 50)), "p95_s": _r(percentile(seconds, 95)),
            "max_s": _r(max(seconds) if seconds else None)}


def burst(url: str, n: int, params: dict, seed: int = 0, timeout: float = 120.0) -> list[Outcome]:
    """`n` gRPC requests released at the same instant (a barrier), each on its own stream."""
    barrier = threading.Barrier(n)
    results: list[Outcome | None] = [None] * n

    def one(index: int) -> None:
        inputs = grpc_tensors({**params, "random_seed": seed + index})
        barrier.wait()
        results[index] = grpc_request(url, inputs, timeout=timeout)

    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout + 30)
    return [r for r in results if r is not None]


def probe_overload(server, *, limit: int, burst_size: int = 12, rounds: int = 3, params: dict | None = None,
                   sustained_s: float = 0.0, clients: int = 12, backoff_s: float = 0.1) -> dict:
    """Admission control. `rounds` times: exactly `limit` requests at once (the unloaded-at-capacity
    latency), then `burst_size` at once: the excess must be refused at once with UNAVAILABLE and the
    admitted ones keep their latency (admitted p95 over at-limit p95, target <= 1.5). One HTTP burst
    shows how Triton 2.51's HTTP frontend reports the refusal. `sustained_s` > 0 adds a closed loop of
    `clients` clients retrying after `backoff_s` (a sustained overload)."""
    params = params or STEADY
    at_limit, loaded = [], []
    for r in range(rounds):
        at_limit += burst(server.grpc_url, limit, params, seed=1000 * r)
        loaded += burst(server.grpc_url, burst_size, params, seed=1000 * r + 100)
    admitted = [o for o in loaded if o.ok]
    rejected = [o for o in loaded if o.status == "UNAVAILABLE"]
    others = [o for o in loaded if not o.ok and o.status != "UNAVAILABLE"]
    base = _latency([o for o in at_limit if o.ok])
    admitted_latency = _latency(admitted)
    ratio = (None if not base["p95_s"] or admitted_latency["p95_s"] is None
             else round(admitted_latency["p95_s"] / base["p95_s"], 3))
    rejection_ms = [o.seconds * 1000 for o in rejected]
    result = {
        "limit": limit, "burst": burst_size, "rounds": rounds,
        "params": {k: v for k, v in params.items() if k != "text_input"},
        "at_limit": {"requests": len(at_limit), "ok": sum(o.ok for o in at_limit),
                     "failed": [o.brief() for o in at_limit if not o.ok][:3], **base},
        "overloaded": {"requests": len(loaded), "admitted": len(admitted), "rejected": len(rejected),
                       "other_errors": len(others), "other_error_samples": [o.brief() for o in others[:3]],
                       "admitted_latency": admitted_latency,
                       "rejection_ms": {"p50": _r(percentile(rejection_ms, 50), 1),
                                        "p95": _r(percentile(rejection_ms, 95), 1),
                                        "max": _r(max(rejection_ms) if rejection_ms else None, 1)},
                       "rejection_message": rejected[0].message if rejected else None},
        "admitted_p95_over_at_limit_p95": ratio, "target_ratio": 1.5,
        "within_target": ratio is not None and ratio <= 1.5,
        "http_burst": _http_burst(server.http_url, burst_size, params),
        "inflight_after": metric(scrape(server.metrics_url), "minigpt5_inflight_requests"),
    }
    if sustained_s > 0:
        loop = closed_loop(server.grpc_url, clients=clients, duration_s=sustained_s, params=params,
                           backoff_s=backoff_s, alive=lambda: _alive(server))
        ok = [o for o in loop if o.ok]
        refused = [o for o in loop if o.status == "UNAVAILABLE" and "max_inflight_requests" in o.message]
        result["sustained"] = {
            "clients": clients, "seconds": sustained_s, "backoff_s": backoff_s, "requests": len(loop),
            "ok": len(ok), "refused": len(refused), "other": len(loop) - len(ok) - len(refused),
            "other_samples": [o.brief() for o in loop if not o.ok and o not in refused][:3],
            "ok_latency": _latency(ok),
            "server_alive": server.process.process.poll() is None, "watchdog": server.process.crash}
    return result


def _http_burst(url: str, clients: int, params: dict) -> dict:
    """`clients` /generate requests at once: how Triton 2.51's HTTP frontend reports the refusals."""
    barrier = threading.Barrier(clients)
    results: list[Outcome] = []
    lock = threading.Lock()

    def one(index: int) -> None:
        barrier.wait()
        outcome = http_request(url, generate_path(False), json.dumps({**params, "random_seed": index}).encode())
        with lock:
            results.append(outcome)

    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(180)
    refused = [o for o in results if "max_inflight_requests" in o.message]
    return {"requests": len(results), "ok": sum(o.ok for o in results), "refused": len(refused),
            "refused_status": dict(collections.Counter(o.status for o in refused)),
            "other": [o.brief() for o in results if not o.ok and o not in refused][:3],
            "refusal_max_ms": _r(max((o.seconds * 1000 for o in refused), default=None), 1)}


# ---- request timeout --------------------------------------------------------------------------------
def probe_timeout(server, timeout_s: float, params: dict | None = None) -> dict:
    """A request longer than request_timeout_s ends UNAVAILABLE (gRPC) naming the parameter."""
    params = params or OVERTIME
    grpc_outcome = grpc_request(server.grpc_url, grpc_tensors({**params, "stream": True}), timeout=timeout_s + 120)
    http_outcome = http_request(server.http_url, generate_path(False), json.dumps(params).encode(),
                                timeout=timeout_s + 120)
    return {"request_timeout_s": timeout_s,
            "grpc": {**grpc_outcome.brief(), "events_before": grpc_outcome.events,
                     "names_parameter": "request_timeout_s" in grpc_outcome.message},
            "http": {**http_outcome.brief(), "names_parameter": "request_timeout_s" in http_outcome.message},
            "served_after": grpc_request(server.grpc_url, grpc_tensors(SHORT)).ok}


# ---- disconnects ------------------------------------------------------------------------------------
def _wait_outcome(metrics_url: str, before: dict, bound_s: float) -> tuple[str | None, float]:
    """Poll the outcome counters until one moves; (outcome, seconds) or (None, bound)."""
    started = time.monotonic()
    while time.monotonic() - started < bound_s:
        now = outcomes(metrics_url)
        moved = [o for o in now if now[o] > before.get(o, 0)]
        if moved:
            return moved[0], time.monotonic() - started
        time.sleep(0.05)
    return None, bound_s


def _decoder_steps(metrics_url: str) -> float:
    return metric(scrape(metrics_url), "minigpt5_decoder_batch_size_count")


def probe_disconnects(server, params: dict | None = None, events_before: int = 3, bound_s: float = 30.0) -> dict:
    return {"grpc_cancel": probe_grpc_cancel(server, params, events_before, bound_s),
            "sse_close": probe_sse_close(server, params, events_before, bound_s)}


def _after_stop(server, steps_at_disconnect: float, outcome: str | None, stopped_after_s: float,
                max_tokens: int, steps_at_start: float) -> dict:
    steps_end = _decoder_steps(server.metrics_url)
    values = scrape(server.metrics_url)
    follow_up = grpc_request(server.grpc_url, grpc_tensors(SHORT), timeout=60)
    return {"outcome": outcome, "stopped_after_s": _r(stopped_after_s),
            "decoder_steps_before_disconnect": int(steps_at_disconnect - steps_at_start),
            "decoder_steps_after_disconnect": int(steps_end - steps_at_disconnect),
            "max_tokens": max_tokens,
            "inflight_after": metric(values, "minigpt5_inflight_requests"),
            "next_request_ok": follow_up.ok, "next_request_s": _r(follow_up.seconds)}


def probe_grpc_cancel(server, params: dict | None = None, events_before: int = 3, bound_s: float = 30.0) -> dict:
    """The client cancels its stream after a few events: when does the request stop, and how many decoder
    steps ran after the cancel (the decoder runs only this request here)."""
    params = {**(params or LONG), "stream": True}
    before, steps_start = outcomes(server.metrics_url), _decoder_steps(server.metrics_url)
    outcome = grpc_request(server.grpc_url, grpc_tensors(params), cancel_after_events=events_before, timeout=60)
    steps_cancel = _decoder_steps(server.metrics_url)
    ended, seconds = _wait_outcome(server.metrics_url, before, bound_s)
    return {"events_read": outcome.events, **_after_stop(server, steps_cancel, ended, seconds, params["max_tokens"],
                                                         steps_start)}


def probe_sse_close(server, params: dict | None = None, events_before: int = 3, bound_s: float = 30.0) -> dict:
    """The client closes its SSE connection after a few events (Triton 2.51's HTTP frontend cancels the
    request when the connection goes: http_server.cc RequestFiniHook)."""
    params = {**(params or LONG), "stream": True}
    host, _, port = server.http_url.rpartition(":")
    body = json.dumps(params).encode()
    before, steps_start = outcomes(server.metrics_url), _decoder_steps(server.metrics_url)
    sock = socket.create_connection((host, int(port)), timeout=60)
    try:
        sock.sendall(b"POST %s HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                     % (generate_path(True).encode(), host.encode(), len(body), body))
        received = b""
        while received.count(b"data:") < events_before:
            chunk = sock.recv(65536)
            if not chunk:
                break
            received += chunk
    finally:
        sock.close()
    steps_close = _decoder_steps(server.metrics_url)
    ended, seconds = _wait_outcome(server.metrics_url, before, bound_s)
    return {"events_read": received.count(b"data:"),
            **_after_stop(server, steps_close, ended, seconds, params["max_tokens"], steps_start)}


# ---- soak -------------------------------------------------------------------------------------------
def soak_requests() -> list[tuple[str, dict]]:
    """The mix a soak cycles through: text over gRPC and SSE, an image, an input image."""
    pixels = np.random.RandomState(0).randint(0, 256, (1, 224, 224, 3), dtype=np.uint8)
    return [("grpc_text", {"text_input": "Tell me a story.", "max_tokens": 24}),
            ("sse_text", {"text_input": "Tell me a story.", "max_tokens": 24, "stream": True}),
            ("grpc_image", {"text_input": "Draw a cat.", "max_tokens": 12, "force_image": True,
                            "num_inference_steps": 3, "scheduler": "dpm"}),
            ("grpc_input_image", {"text_input": "What is this?", "max_tokens": 16, "images": pixels})]


def probe_soak(server, *, duration_s: float, clients: int, warmup_s: float, sample_every_s: float = 2.0,
               timeout: float = 120.0) -> dict:
    """`clients` closed-loop clients for `duration_s`; RSS of tritonserver + stubs sampled throughout;
    growth = mean of the last 3 samples over the mean of the 3 samples at the end of the warm-up."""
    mix = soak_requests()
    failures: list[dict] = []
    counts = collections.Counter()
    latencies: list[float] = []
    lock = threading.Lock()
    stop = threading.Event()

    def client(index: int) -> None:
        n = index
        while not stop.is_set() and _alive(server):
            kind, params = mix[n % len(mix)]
            params = {**params, "random_seed": n}
            if kind.startswith("sse"):
                outcome = http_request(server.http_url, generate_path(True), json.dumps(params).encode(),
                                       timeout=timeout)
            else:
                outcome = grpc_request(server.grpc_url, grpc_tensors({**params, "stream": True}), timeout=timeout)
            n += clients
            with lock:
                counts[kind] += 1
                latencies.append(outcome.seconds)
                if not outcome.ok:
                    failures.append({"kind": kind, **outcome.brief()})

    started = time.monotonic()
    samples: list[tuple[float, int]] = []
    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for thread in threads:
        thread.start()
    died_after = None
    while time.monotonic() - started < duration_s:
        if not _alive(server):
            died_after = time.monotonic() - started
            break
        samples.append((time.monotonic() - started, rss_bytes(server)))
        time.sleep(sample_every_s)
    stop.set()
    for thread in threads:
        thread.join(timeout + 30)
    if _alive(server):
        samples.append((time.monotonic() - started, rss_bytes(server)))
    elif died_after is None:
        died_after = time.monotonic() - started
    warm = [rss for t, rss in samples if t >= warmup_s][:3]
    end = [rss for _, rss in samples[-3:]]
    growth = None if died_after is not None or not warm else float(np.mean(end)) / float(np.mean(warm)) - 1.0
    return {"duration_s": round(time.monotonic() - started, 1), "clients": clients, "warmup_s": warmup_s,
            "server_died_after_s": _r(died_after, 1), "watchdog": server.process.crash,
            "requests": sum(counts.values()), "by_kind": dict(counts), "failures": len(failures),
            "failure_samples": failures[:5], "latency": {"p50_s": _r(percentile(latencies, 50)),
                                                        "p95_s": _r(percentile(latencies, 95))},
            "rss_mb_after_warmup": round(float(np.mean(warm)) / 2**20, 1) if warm else None,
            "rss_mb_end": round(float(np.mean(end)) / 2**20, 1) if end else None,
            "rss_growth": None if growth is None else round(growth, 4),
            "rss_growth_limit": 0.05, "within_limit": growth is not None and growth < 0.05,
            "rss_mb_samples": [[round(t, 1), round(rss / 2**20, 1)] for t, rss in samples]}


# ---- crash ------------------------------------------------------------------------------------------
# Busy in the killed model when its stub is killed. For `vicuna_decoder`: a long text, killed at its
# first text event (900 tokens take about a second here, far longer than the kill). For the others:
# once `image_start` came, the request waits in `minigpt5` for `image_decoder`, which works on its
# 200 steps for seconds.
CRASH_REQUEST = {"text_input": "Draw a cat.", "max_tokens": 8, "force_image": True, "num_inference_steps": 200,
                 "random_seed": 1, "stream": True}
CRASH_BUSY_EVENT = "image_start"
CRASH_DECODER_REQUEST = {**LONG, "stream": True}
CRASH_ATTEMPTS = 3  # new requests when one ended before the kill came


def _start_busy_requests(server, request: dict, busy_event: str, inflight: int, client_timeout: float):
    """`inflight` streamed requests, returned once each has sent `busy_event` (or ended): their threads,
    {index: (Outcome, end time)} of those that ended, and the lock guarding it."""
    busy = threading.Semaphore(0)
    ended: dict[int, tuple[Outcome, float]] = {}
    lock = threading.Lock()

    def one(index: int) -> None:
        flagged = []

        def on_event(outcome: Outcome) -> None:
            if not flagged and busy_event in outcome.event_types:
                flagged.append(True)
                busy.release()
        outcome = grpc_request(server.grpc_url, grpc_tensors({**request, "random_seed": index}),
                               on_event=on_event, timeout=client_timeout)
        with lock:
            ended[index] = (outcome, time.monotonic())
        if not flagged:
            busy.release()

    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(inflight)]
    for thread in threads:
        thread.start()
    for _ in threads:
        busy.acquire(timeout=60)
    return threads, ended, lock


def probe_crash(server, model: str = "minigpt5", *, inflight: int = 2, client_timeout: float = 120.0,
                bound_s: float = 60.0) -> dict:
    """kill -9 of `model`'s stub while `inflight` requests are in it. Every client call has a timeout;
    reports how each in-flight request ended, readiness, and whether/when the server went away."""
    request, busy_event = ((CRASH_DECODER_REQUEST, "text") if model == "vicuna_decoder"
                           else (CRASH_REQUEST, CRASH_BUSY_EVENT))
    for attempt in range(1, CRASH_ATTEMPTS + 1):
        threads, ended, lock = _start_busy_requests(server, request, busy_event, inflight, client_timeout)
        with lock:
            if not ended or attempt == CRASH_ATTEMPTS:
                break
        for thread in threads:  # one ended before the kill (a starved client thread on a busy machine): again
            thread.join(client_timeout)
    stubs = {m: pid for pid, m in server.process.stubs().items()}
    if model not in stubs:
        raise RuntimeError(f"no live stub of {model} under tritonserver {server.process.process.pid}: {stubs}")
    busy_at_kill = inflight - len(ended)
    os.kill(stubs[model], signal.SIGKILL)
    killed = time.monotonic()
    ready, exited_after, first_not_ready = [], None, None
    while time.monotonic() - killed < bound_s:
        status = http_get_status(server.http_url, "/v2/health/ready", timeout=2)
        elapsed = time.monotonic() - killed
        ready.append([round(elapsed, 2), status])
        if status != "200" and first_not_ready is None:
            first_not_ready = elapsed
        if exited_after is None and server.process.process.poll() is not None:
            exited_after = elapsed
        with lock:
            done = len(ended) == inflight
        if done and (exited_after is not None or elapsed > 20):
            break
        time.sleep(0.25)
    for thread in threads:
        thread.join(max(0.0, client_timeout - (time.monotonic() - killed)) + 5)
    requests = [{**o.brief(), "ended_after_kill_s": _r(t - killed), "events": o.events}
                for o, t in (ended[i] for i in sorted(ended))]
    after = grpc_request(server.grpc_url, grpc_tensors(SHORT), timeout=30)
    return {"model": model, "stub_pid": stubs[model], "attempts": attempt, "busy_at_kill": busy_at_kill,
            "in_flight": requests,
            "hung": inflight - len(ended), "ended_with_error": sum(not r["ok"] for r in requests),
            "ended_ok": sum(r["ok"] for r in requests),
            "max_end_after_kill_s": _r(max((r["ended_after_kill_s"] for r in requests), default=None)),
            "ready_first_not_200_after_s": _r(first_not_ready), "ready_samples": ready[:12],
            "server_exited_after_s": _r(exited_after), "server_exit_code": server.process.process.poll(),
            "watchdog": server.process.crash, "next_request": after.brief()}


# ---- Triton's HTTP body limit -----------------------------------------------------------------------
ECHO_CONFIG = """name: "echo"
backend: "python"
max_batch_size: 0
model_transaction_policy { decoupled: true }
input [ { name: "text_input", data_type: TYPE_STRING, dims: [ 1 ] } ]
output [ { name: "text_output", data_type: TYPE_STRING, dims: [ 1 ] } ]
instance_group [ { count: 1, kind: KIND_CPU } ]
"""
ECHO_MODEL = '''import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        for request in requests:
            text = pb_utils.get_input_tensor_by_name(request, "text_input").as_numpy().reshape(-1)[0]
            size = np.array([str(len(text)).encode()], dtype=np.object_)
            request.get_response_sender().send(pb_utils.InferenceResponse([pb_utils.Tensor("text_output", size)]),
                                               flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        return None
'''


def echo_repository(root: Path) -> Path:
    """A one-model repository (a decoupled python model answering its input's length, like `minigpt5`):
    starts in seconds."""
    model = root / "echo_repository" / "echo"
    (model / "1").mkdir(parents=True, exist_ok=True)
    (model / "config.pbtxt").write_text(ECHO_CONFIG)
    (model / "1" / "model.py").write_text(ECHO_MODEL)
    return model.parent


FORM = "application/x-www-form-urlencoded"  # what `curl -d` and urllib send by default


def post_body(url: str, body: bytes, *, content_type: str = "application/json", chunked: bool = False,
              timeout: float = 60.0) -> str:
    """POST `body` to the echo model's /generate: the status, or how it failed."""
    host, _, port = url.rpartition(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        connection.request("POST", "/v2/models/echo/generate", body=iter([body]) if chunked else body,
                           headers={"Content-Type": content_type}, encode_chunked=chunked)
        reply = connection.getresponse()
        reply.read()
        return str(reply.status)
    except (OSError, http.client.HTTPException) as exc:
        return f"connection_error: {type(exc).__name__}"
    finally:
        connection.close()


def infer_body(size: int) -> bytes:
    """A /generate JSON body of about `size` bytes."""
    return json.dumps({"text_input": "a" * size}).encode()


def probe_http_body(start_server, sizes=(1 << 20, 8 << 20)) -> dict:
    """Triton 2.51's HTTP frontend on request bodies of `sizes` bytes sent as JSON, as a form (curl -d's
    and urllib's default Content-Type) and chunked. `start_server()` returns a ready server of the echo
    repository; it is started again whenever the previous body took it down."""
    rows = []
    server = None
    try:
        for size in sizes:
            for content_type, chunked in (("application/json", False), (FORM, True), (FORM, False)):
                if server is None or server.process.process.poll() is not None:
                    if server is not None:
                        server.stop()
                    server = start_server()
                status = post_body(server.http_url, infer_body(size), content_type=content_type, chunked=chunked)
                deadline = time.monotonic() + 10
                while server.process.process.poll() is None and status.startswith("connection_error") \
                        and time.monotonic() < deadline:
                    time.sleep(0.2)
                rows.append({"body_bytes": size, "content_type": content_type, "chunked": chunked, "status": status,
                             "server_alive": server.process.process.poll() is None,
                             "exit_code": server.process.process.poll()})
    finally:
        if server is not None:
            server.stop()
    return {"rows": rows,
            "note": "Triton 2.51's HTTP frontend dies (SIGSEGV) on an application/x-www-form-urlencoded body "
                    "above about 4 MiB (4,184,7xx bytes measured), the Content-Type `curl -d` and urllib send "
                    "by default; JSON and chunked bodies pass. Upstream, not ours to fix: clients send "
                    "Content-Type: application/json, and a proxy in front limits bodies (docs/LIMITS.md)."}


# ---- the command ------------------------------------------------------------------------------------
SECTIONS = ("inputs", "security", "overload", "timeout", "disconnect", "soak", "crash", "http_body")
MODELS = ("minigpt5", "vision_encoder", "vicuna_decoder", "image_decoder")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--weights", type=Path, help="weights directory (default: the built-in tiny weights)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto: the servers' models")
    p.add_argument("--limit", type=int, default=2, help="max_inflight_requests of the main server")
    p.add_argument("--burst", type=int, default=12, help="requests released at once in each overload round")
    p.add_argument("--rounds", type=int, default=5, help="overload rounds (at the limit, then a burst)")
    p.add_argument("--sustained-s", type=float, default=20.0,
                   help="seconds of sustained overload (--clients retrying after --backoff-s); 0: none")
    p.add_argument("--clients", type=int, default=12, help="clients of the sustained overload")
    p.add_argument("--backoff-s", type=float, default=0.1, help="a refused client retries after this long")
    p.add_argument("--timeout-s", type=float, default=2.0,
                   help="request_timeout_s of the crash servers, where the timeout is probed first (the main "
                        "server keeps the default 600 s: a noisy machine must not fail its soak)")
    p.add_argument("--soak-s", type=float, default=60.0, help="soak duration in seconds")
    p.add_argument("--soak-clients", type=int, default=2, help="soak clients (at most --limit: no refusals)")
    p.add_argument("--soak-warmup-s", type=float, default=15.0, help="RSS growth is measured from this point")
    p.add_argument("--crash-models", type=name_list, default=["minigpt5", "vicuna_decoder", "image_decoder"],
                   help=f"comma-separated models whose stub is killed, one fresh server each ({', '.join(MODELS)})")
    p.add_argument("--skip", type=name_list, default=[],
                   help=f"comma-separated sections to skip: {', '.join(SECTIONS)}")
    p.add_argument("--out", type=Path, help="also write the JSON here (rewritten after every section)")
    p.add_argument("--json", action="store_true", help="print the JSON result to stdout (always on)")


def run(args) -> int:
    from ..weights.tiny import resolve_weights
    from .report import Report  # imports torch: not at registration time

    weights = resolve_weights(args.weights)
    report = Report("reliability", skip=args.skip, out=args.out)
    admin_key = secrets.token_urlsafe(16)
    parameters = {"minigpt5": {"max_inflight_requests": str(args.limit)}}
    report.data["settings"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                               if k not in ("handler", "json")}
    report.data["weights"] = str(weights)
    tally = {"crashes": 0, "recoveries": 0, "unexpected_deaths": []}
    main_sections = [s for s in ("inputs", "security", "disconnect", "soak", "overload") if s not in args.skip]
    if main_sections:
        server = LocalServer(weights, device=args.device, parameters=parameters, admin_key=admin_key)
        try:
            report.section(("servers", "main"), lambda: {"start_s": round(server.start(), 1),
                                                         "log": str(server.log_path), "parameters": parameters},
                           required=True)
            if server.process.process is not None and server.process.process.poll() is None:
                expected = set(server.process.stubs().values())
                probes = {
                    "inputs": lambda: probe_inputs(server),
                    "security": lambda: probe_security(server, admin_key),
                    "overload": lambda: probe_overload(server, limit=args.limit, burst_size=args.burst,
                                                       rounds=args.rounds, sustained_s=args.sustained_s,
                                                       clients=args.clients, backoff_s=args.backoff_s),
                    "disconnect": lambda: probe_disconnects(server),
                    "soak": lambda: probe_soak(server, duration_s=args.soak_s,
                                               clients=min(args.soak_clients, args.limit), warmup_s=args.soak_warmup_s),
                }
                for name in main_sections:
                    report.section((name,), probes[name], group=name)
                    if not server.healthy(expected):  # an unplanned crash: count it, restart, go on
                        tally["crashes"] += 1
                        tally["unexpected_deaths"].append({"after": name, "watchdog": server.process.crash,
                                                           "exit_code": server.process.process.poll()})
                        server.stop()
                        server.start()
                        tally["recoveries"] += 1
        finally:
            report.data["servers"]["main"]["exit_code"] = server.stop()
    # Crash servers: request_timeout_s=--timeout-s; the first one probes the timeout before its kill.
    crash_models = [] if "crash" in args.skip else list(args.crash_models)
    runs = crash_models or ([None] if "timeout" not in args.skip else [])
    for index, model in enumerate(runs):
        with_timeout = index == 0 and "timeout" not in args.skip
        report.section(("crash", model or "none"),
                       lambda model=model, with_timeout=with_timeout: _crash_and_recover(
                           weights, args.device, model, tally, args.timeout_s, report if with_timeout else None),
                       required=True)
    if "http_body" not in args.skip:
        root = Path(tempfile.mkdtemp(prefix="minigpt5-bench-reliability-echo-"))
        repository = echo_repository(root)

        def start_echo():
            echo = LocalServer(weights, device="cpu", repository=repository, name="echo")
            echo.start(timeout=120)
            return echo
        report.section(("http_body",), lambda: probe_http_body(start_echo), group="http_body")
    report.data.update({"crashes": tally["crashes"], "recoveries": tally["recoveries"],
                        "unexpected_deaths": tally["unexpected_deaths"]})
    report.data["summary"] = summarize(report.data)
    return report.finish()


def _crash_and_recover(weights: Path, device: str, model: str | None, tally: dict, timeout_s: float,
                       timeout_report) -> dict:
    """A fresh server (request_timeout_s=timeout_s): the timeout probe (into `timeout_report`), the kill
    of `model`'s stub, then the same server started again (what the orchestrator does)."""
    server = LocalServer(weights, device=device, name=f"crash-{model}",
                         parameters={"minigpt5": {"request_timeout_s": f"{timeout_s:g}"}})
    try:
        result = {"start_s": round(server.start(), 1), "request_timeout_s": timeout_s}
        if timeout_report is not None:
            timeout_report.section(("timeout",), lambda: probe_timeout(server, timeout_s), group="timeout")
        if model is None:
            return result
        result.update(probe_crash(server, model))
        server.stop()
        restart_started = time.monotonic()
        server.start()
        served = grpc_request(server.grpc_url, grpc_tensors(SHORT), timeout=60)
        tally["recoveries"] += int(served.ok)
        result["recovery"] = {"restarted_and_served": served.ok,
                              "seconds": round(time.monotonic() - restart_started, 1),
                              "how": "tritonserver started again on the same ports (what Kubernetes does when "
                                     "`minigpt5 serve` exits)"}
        return result
    finally:
        server.stop()


def summarize(data: dict) -> dict:
    """The headline counts and figures, from the sections present."""
    def get(*path):
        node = data
        for key in path:
            if not isinstance(node, dict) or key not in node:
                return None
            node = node[key]
        return node

    crash_runs = {k: v for k, v in (data.get("crash") or {}).items() if isinstance(v, dict) and "in_flight" in v}
    return {
        "input_classes": get("inputs", "input_classes"),
        "input_cases": get("inputs", "cases"),
        "input_requests": get("inputs", "requests"),
        "errors_returned": get("inputs", "errors_returned"),
        "invalid_arg": get("inputs", "invalid_arg"),
        "field_named": get("inputs", "field_named"),
        "inputs_unexpected": None if get("inputs", "unexpected") is None else len(get("inputs", "unexpected")),
        "restricted_api_refusals": get("security", "refused"),
        "restricted_api_tried": get("security", "tried"),
        "crashes": data.get("crashes"),
        "recoveries": data.get("recoveries"),
        "overload_rejected": get("overload", "overloaded", "rejected"),
        "overload_admitted": get("overload", "overloaded", "admitted"),
        "overload_rejection_p95_ms": get("overload", "overloaded", "rejection_ms", "p95"),
        "overload_admitted_p95_over_at_limit_p95": get("overload", "admitted_p95_over_at_limit_p95"),
        "timeout_status": get("timeout", "grpc", "status"),
        "timeout_ended_after_s": get("timeout", "grpc", "seconds"),
        "grpc_cancel_stopped_after_s": get("disconnect", "grpc_cancel", "stopped_after_s"),
        "grpc_cancel_steps_after": get("disconnect", "grpc_cancel", "decoder_steps_after_disconnect"),
        "sse_close_outcome": get("disconnect", "sse_close", "outcome"),
        "sse_close_stopped_after_s": get("disconnect", "sse_close", "stopped_after_s"),
        "sse_close_steps_after": get("disconnect", "sse_close", "decoder_steps_after_disconnect"),
        "soak_requests": get("soak", "requests"),
        "soak_failures": get("soak", "failures"),
        "soak_rss_growth": get("soak", "rss_growth"),
        "kill9": {model: {"hung": run_["hung"], "ended_with_error": run_["ended_with_error"],
                          "server_exited_after_s": run_["server_exited_after_s"],
                          "recovered": (run_.get("recovery") or {}).get("restarted_and_served")}
                  for model, run_ in crash_runs.items()},
    }
