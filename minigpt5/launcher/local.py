"""tritonserver on free local ports, for the tests and the benches: a TritonProcess with its own work
directory and log file, started and stopped in one call each."""

from __future__ import annotations

import socket
import tempfile
import time
from pathlib import Path

from .process import TritonProcess


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def local_process(
    weights: Path,
    *,
    device: str = "cpu",
    parameters: dict | None = None,
    workdir: Path | None = None,
    name: str = "server",
    **process_options,
) -> TritonProcess:
    """A TritonProcess (not started) bound to 127.0.0.1 on free ports, with a work directory of its own
    (a new temporary one by default) holding its log, tritonserver.log."""
    workdir = Path(workdir or tempfile.mkdtemp(prefix=f"minigpt5-{name}-"))
    workdir.mkdir(parents=True, exist_ok=True)
    return TritonProcess(
        weights,
        http_port=free_port(),
        grpc_port=free_port(),
        metrics_port=free_port(),
        host="127.0.0.1",
        device=device,
        workdir=workdir,
        log_file=workdir / "tritonserver.log",
        parameters=parameters,
        **process_options,
    )


class LocalServer:
    """The real tritonserver on the real (or a given) model repository, bound to 127.0.0.1 on free ports.
    `parameters`: config.pbtxt overrides, e.g. {"minigpt5": {"max_inflight_requests": "2"}}. The other
    keywords go to TritonProcess."""

    def __init__(
        self,
        weights: Path,
        *,
        device: str = "cpu",
        parameters: dict | None = None,
        workdir: Path | None = None,
        name: str = "server",
        **process_options,
    ):
        self.weights_dir = Path(weights)
        self.process = local_process(
            weights, device=device, parameters=parameters, workdir=workdir, name=name, **process_options
        )
        self.workdir, self.log_path = self.process.workdir, Path(self.process.log_file)
        self.http_url, self.grpc_url = self.process.http_url, self.process.grpc_url
        self.metrics_url = self.process.metrics_url

    def start(self, timeout: float | None = 300.0) -> float:
        """Start and wait until ready; the seconds it took. Raises RuntimeError with the log's tail."""
        started = time.monotonic()
        self.process.start()
        try:
            self.process.wait_ready(timeout=timeout)
        except Exception as exc:
            self.stop(timeout=15)
            raise RuntimeError(
                f"tritonserver did not start ({exc}); the end of {self.log_path}:\n{self.log_tail()}"
            ) from None
        return time.monotonic() - started

    def stop(self, timeout: float | None = None) -> int | None:
        return self.process.stop(timeout=timeout)

    def log_tail(self, lines: int = 60) -> str:
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def healthy(self, expected_models: set[str]) -> bool:
        """tritonserver runs and every expected model has its stub process."""
        alive = self.process.process is not None and self.process.process.poll() is None
        return alive and set(self.process.stubs().values()) >= expected_models
