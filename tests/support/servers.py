"""tritonserver for the tests: the real model repository on free ports."""

from __future__ import annotations

import pytest

from minigpt5.launcher.local import LocalServer


def start_server(weights, log_dir, parameters=None):
    """The real tritonserver on the real model repository, on free ports; fails the test if it cannot start.
    `parameters`: config.pbtxt overrides, e.g. {"minigpt5": {"max_inflight_requests": "2"}}."""
    server = LocalServer(weights, parameters=parameters, workdir=log_dir)
    try:
        server.start(timeout=300)
    except RuntimeError as exc:
        pytest.fail(str(exc))
    return server
