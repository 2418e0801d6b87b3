"""Shared fixtures: tiny weights built once per session, the in-process reference pipeline."""
from __future__ import annotations

import pytest

from minigpt5.launcher.local import LocalServer, free_port  # noqa: F401  (free_port: for the tests)


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory):
    from minigpt5.weights.tiny import build_tiny_weights
    return build_tiny_weights(tmp_path_factory.mktemp("weights") / "tiny", seed=0)


@pytest.fixture(scope="session")
def reference_pipeline(tiny_weights):
    from minigpt5.pipeline import MiniGPT5Pipeline
    return MiniGPT5Pipeline(tiny_weights, device="cpu")


def start_server(weights, log_dir, parameters=None):
    """The real tritonserver on the real model repository, on free ports; fails the test if it cannot start.
    `parameters`: config.pbtxt overrides, e.g. {"minigpt5": {"max_inflight_requests": "2"}}."""
    server = LocalServer(weights, parameters=parameters, workdir=log_dir)
    try:
        server.start(timeout=300)
    except RuntimeError as exc:
        pytest.fail(str(exc))
    return server


@pytest.fixture(scope="session")
def triton_server(tiny_weights, tmp_path_factory):
    """One server shared by the whole session (tests that may break a server use their own)."""
    server = start_server(tiny_weights, tmp_path_factory.mktemp("triton"))
    yield server
    server.process.stop()
