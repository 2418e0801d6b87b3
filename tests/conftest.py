"""Shared fixtures: tiny weights built once per session, the in-process reference pipeline."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory):
    from minigpt5.weights.tiny import build_tiny_weights
    return build_tiny_weights(tmp_path_factory.mktemp("weights") / "tiny", seed=0)


@pytest.fixture(scope="session")
def reference_pipeline(tiny_weights):
    from minigpt5.pipeline import MiniGPT5Pipeline
    return MiniGPT5Pipeline(tiny_weights, device="cpu")


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RunningServer:
    def __init__(self, process, weights_dir, log_path):
        self.process = process
        self.weights_dir = weights_dir
        self.log_path = log_path
        self.http_url = f"127.0.0.1:{process.http_port}"
        self.grpc_url = f"127.0.0.1:{process.grpc_port}"
        self.metrics_url = f"http://127.0.0.1:{process.metrics_port}/metrics"

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


def start_server(weights, log_dir, parameters=None) -> RunningServer:
    """The real tritonserver on the real model repository, on free ports; fails the test if it cannot start.
    `parameters`: config.pbtxt overrides, e.g. {"minigpt5": {"max_inflight_requests": "2"}}."""
    from minigpt5.serving.server import TritonProcess
    log_path = log_dir / "tritonserver.log"
    process = TritonProcess(weights, http_port=free_port(), grpc_port=free_port(), metrics_port=free_port(),
                            host="127.0.0.1", device="cpu", log_file=log_path, parameters=parameters)
    process.start()
    server = RunningServer(process, weights, log_path)
    try:
        process.wait_ready(timeout=300)
    except Exception:
        process.stop()
        pytest.fail(f"tritonserver did not start:\n{server.log_tail()}")
    return server


@pytest.fixture(scope="session")
def triton_server(tiny_weights, tmp_path_factory):
    """One server shared by the whole session (tests that may break a server use their own)."""
    server = start_server(tiny_weights, tmp_path_factory.mktemp("triton"))
    yield server
    server.process.stop()
