"""Triton 2.51's HTTP frontend and request bodies around 4 MiB, on a trivial one-model repository."""

from __future__ import annotations

import http.client
import json
import time
from pathlib import Path

ECHO_CONFIG = """name: "echo"
backend: "python"
max_batch_size: 0
model_transaction_policy { decoupled: true }
input [ { name: "text_input", data_type: TYPE_STRING, dims: [ 1 ] } ]
output [ { name: "text_output", data_type: TYPE_STRING, dims: [ 1 ] } ]
instance_group [ { count: 1, kind: KIND_CPU } ]
"""
ECHO_MODEL = """import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        for request in requests:
            text = pb_utils.get_input_tensor_by_name(request, "text_input").as_numpy().reshape(-1)[0]
            size = np.array([str(len(text)).encode()], dtype=np.object_)
            request.get_response_sender().send(pb_utils.InferenceResponse([pb_utils.Tensor("text_output", size)]),
                                               flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        return None
"""


def echo_repository(root: Path) -> Path:
    """A one-model repository (a decoupled python model answering its input's length, like `minigpt5`):
    starts in seconds."""
    model = root / "echo_repository" / "echo"
    (model / "1").mkdir(parents=True, exist_ok=True)
    (model / "config.pbtxt").write_text(ECHO_CONFIG)
    (model / "1" / "model.py").write_text(ECHO_MODEL)
    return model.parent


FORM = "application/x-www-form-urlencoded"  # what `curl -d` and urllib send by default


def post_body(
    url: str, body: bytes, *, content_type: str = "application/json", chunked: bool = False, timeout: float = 60.0
) -> str:
    """POST `body` to the echo model's /generate: the status, or how it failed."""
    host, _, port = url.rpartition(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        connection.request(
            "POST",
            "/v2/models/echo/generate",
            body=iter([body]) if chunked else body,
            headers={"Content-Type": content_type},
            encode_chunked=chunked,
        )
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
                while (
                    server.process.process.poll() is None
                    and status.startswith("connection_error")
                    and time.monotonic() < deadline
                ):
                    time.sleep(0.2)
                rows.append(
                    {
                        "body_bytes": size,
                        "content_type": content_type,
                        "chunked": chunked,
                        "status": status,
                        "server_alive": server.process.process.poll() is None,
                        "exit_code": server.process.process.poll(),
                    }
                )
    finally:
        if server is not None:
            server.stop()
    return {
        "rows": rows,
        "note": "Triton 2.51's HTTP frontend dies (SIGSEGV) on an application/x-www-form-urlencoded body "
        "above about 4 MiB (4,184,7xx bytes measured), the Content-Type `curl -d` and urllib send "
        "by default; JSON and chunked bodies pass. Upstream, not ours to fix: clients send "
        "Content-Type: application/json, and a proxy in front limits bodies (docs/LIMITS.md).",
    }
