"""Shared fixtures: tiny weights built once per session, the in-process reference pipeline, one
tritonserver for the session. The tests are grouped by what they need: unit/ (no server), server/ (the
real tritonserver; marked `server`), deploy/ (the deployment files and packaging), browser/ (a real
browser against the gateway's page; marked `browser`); support/ holds their shared code."""

from __future__ import annotations

import pytest

from support.servers import start_server


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory):
    from minigpt5.weights.tiny import build_tiny_weights

    return build_tiny_weights(tmp_path_factory.mktemp("weights") / "tiny", seed=0)


@pytest.fixture(scope="session")
def reference_pipeline(tiny_weights):
    from minigpt5.pipeline import MiniGPT5Pipeline

    return MiniGPT5Pipeline(tiny_weights, device="cpu")


@pytest.fixture(scope="session")
def triton_server(tiny_weights, tmp_path_factory):
    """One server shared by the whole session (tests that may break a server use their own)."""
    server = start_server(tiny_weights, tmp_path_factory.mktemp("triton"))
    yield server
    server.process.stop()


def pytest_collection_modifyitems(items):
    for item in items:
        group = item.path.parent.name
        if group in ("server", "browser"):
            item.add_marker(getattr(pytest.mark, group))
