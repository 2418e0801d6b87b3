"""The gateway for the tests: served by uvicorn in a thread of the test process; a test picture; a
metric read off a server."""

from __future__ import annotations

import threading
import time
import urllib.request

import numpy as np
import uvicorn

from minigpt5.launcher.local import free_port
from minigpt5_client.gateway.app import create_app
from minigpt5_client.gateway.settings import GatewaySettings
from minigpt5_client.preprocess import encode_png


class InProcessGateway:
    """uvicorn serving create_app(settings) in a thread of this process, on a free port."""

    def __init__(self, settings: GatewaySettings):
        self.url = f"http://127.0.0.1:{free_port()}"
        port = int(self.url.rsplit(":", 1)[1])
        self.server = uvicorn.Server(
            uvicorn.Config(
                create_app(settings), host="127.0.0.1", port=port, log_level="warning", timeout_graceful_shutdown=5
            )
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "the gateway did not start"
            time.sleep(0.05)
        return self

    def __exit__(self, *exc_info):
        self.server.should_exit = True
        self.thread.join(timeout=30)


def picture() -> bytes:
    y, x = np.mgrid[0:120, 0:200]
    return encode_png(np.stack([x % 256, y * 2, (x * y) % 256], axis=-1).astype(np.uint8))


def metric(triton, name: str, **labels) -> float:
    text = urllib.request.urlopen(triton.metrics_url, timeout=10).read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items())
    )
