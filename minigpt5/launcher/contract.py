"""What the launcher tells the models it starts, read by both sides: where the weights are and which
device to use (environment variables of the stub processes; config.pbtxt parameters override them),
and that a shutdown has begun (a flag file in the served copy of the `minigpt5` model's directory, raised
by `minigpt5 serve` before it stops tritonserver: drain.py says why)."""

from __future__ import annotations

import os
from pathlib import Path

WEIGHTS_ENV = "MINIGPT5_WEIGHTS"
DEVICE_ENV = "MINIGPT5_DEVICE"
SHUTDOWN_FLAG = "shutting-down"  # in the served copy of model_repository/minigpt5/


def request_shutdown(model_directory: Path) -> None:
    """Tell the `minigpt5` model served from `model_directory` to refuse new requests."""
    (Path(model_directory) / SHUTDOWN_FLAG).touch()


class ShutdownFlag:
    """The model's side: has serve asked for a drain? One stat() per new request."""

    def __init__(self, model_directory: str | os.PathLike | None):
        self._path = Path(model_directory) / SHUTDOWN_FLAG if model_directory else None

    def raised(self) -> bool:
        return self._path is not None and self._path.exists()
