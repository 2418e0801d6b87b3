"""One request, raw, without the client package (wrong dtypes, non-UTF-8 bytes, cancellation), and the
requests the probes send."""

from __future__ import annotations

import http.client
import json
import queue
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field

import numpy as np

from minigpt5_client.contract import MODEL_NAME as MODEL
from minigpt5_client.contract import input_array

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
    responses: list = field(default_factory=list)  # with record=True: (seconds since the send, {output: array})

    def brief(self) -> dict:
        return {
            "transport": self.transport,
            "ok": self.ok,
            "status": self.status,
            "message": self.message[:300],
            "seconds": round(self.seconds, 3),
        }


def grpc_tensors(params: dict, raw=()) -> list:
    """tritonclient inputs from typed params; `raw` (name, array) pairs are sent as given (wrong dtypes,
    shapes, unknown names, raw bytes) and replace params of the same name."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import np_to_triton_dtype

    arrays = {name: input_array(name, value) for name, value in params.items()}
    arrays.update(dict(raw))
    inputs = []
    for name, array in arrays.items():
        dtype = "BYTES" if array.dtype == np.object_ else np_to_triton_dtype(array.dtype)
        tensor = grpcclient.InferInput(name, list(array.shape), dtype)
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


def grpc_request(
    url: str,
    inputs: list,
    *,
    timeout: float = 120.0,
    cancel_after_events: int | None = None,
    on_event=None,
    parameters: dict | None = None,
    model: str = MODEL,
    record: bool = False,
) -> Outcome:
    """One request over gRPC streaming. `cancel_after_events`: cancel the stream after that many
    events (the client gives up). `on_event(outcome)` is called after each event. `record`: keep every
    response's outputs with the time it arrived (taken in the stream's callback)."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    responses: queue.SimpleQueue = queue.SimpleQueue()
    outcome = Outcome("grpc", False, "client_timeout")
    started = time.monotonic()
    client = grpcclient.InferenceServerClient(url)
    finished = False  # cancel only a request abandoned early (2.51 crashes cancelling a completed one)
    try:
        # No `triton_grpc_error` header, as the Python client: stream errors come in-band (docs/RELIABILITY.md)
        client.start_stream(
            callback=lambda result, error: responses.put((time.monotonic(), result, error)), stream_timeout=timeout
        )
        started = time.monotonic()
        client.async_stream_infer(model, inputs, enable_empty_final_response=True, parameters=parameters)
        deadline = started + timeout
        while True:
            try:
                arrived, result, error = responses.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                outcome.message = f"no answer within {timeout:g} s"
                return outcome
            if error is not None:
                finished = True  # the server ended the stream, or refused the request before the model
                outcome.status = grpc_status(error)
                outcome.message = error.message() or ""
                return outcome
            response = result.get_response()
            if response.outputs:
                if record:
                    arrays = {output.name: result.as_numpy(output.name) for output in response.outputs}
                    outcome.responses.append((arrived - started, arrays))
                outcome.events += 1
                kind = first_value(result.as_numpy("event_type"))
                outcome.event_types.append(kind)
                usage = first_value(result.as_numpy("usage")) if kind in ("final", "complete") else None
                if usage:
                    outcome.usage = json.loads(usage)
                if on_event:
                    on_event(outcome)
            final = response.parameters.get("triton_final_response")
            if final is not None and final.bool_param:
                finished = True
                outcome.ok, outcome.status, outcome.seconds = True, "ok", arrived - started
                return outcome
            if cancel_after_events and outcome.events >= cancel_after_events:
                outcome.status = "cancelled_by_client"
                return outcome
    except InferenceServerException as exc:
        outcome.status, outcome.message = grpc_status(exc), exc.message() or str(exc)
        return outcome
    finally:
        if not outcome.ok:
            outcome.seconds = time.monotonic() - started
        try:
            client.stop_stream(cancel_requests=not finished)
            client.close()
        except Exception:  # noqa: BLE001 - a dead server: nothing to close
            pass


def grpc_status(error) -> str:
    """The gRPC status name; for an in-band stream error (no status), the one its message stands for,
    as the Python client reads it (minigpt5_client.errors.from_server_message)."""
    from minigpt5_client.errors import InvalidArgument, Overloaded, from_server_message

    status = error.status() if hasattr(error, "status") else None
    if status:
        return str(status).removeprefix("StatusCode.")
    kind = type(from_server_message(error.message() or ""))
    return {InvalidArgument: "INVALID_ARGUMENT", Overloaded: "UNAVAILABLE"}.get(kind, "INTERNAL")


def first_value(array):
    if array is None or not array.size:
        return None
    value = array.reshape(-1)[0]
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def http_request(
    url: str, path: str, body: bytes, *, timeout: float = 120.0, headers: dict | None = None, method: str = "POST"
) -> Outcome:
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
        outcome.ok = (
            reply.status == 200
            and not outcome.message
            and bool(outcome.event_types)
            and outcome.event_types[-1] in ("final", "complete")
        )
        if (
            not outcome.ok
            and reply.status == 200
            and not outcome.message
            and path.startswith("/v2/models/")
            and not path.endswith(("generate", "generate_stream"))
        ):
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
