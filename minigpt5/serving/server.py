"""`minigpt5 serve`: run the real tritonserver on `model_repository/`.

Where tritonserver comes from:
- on PATH (the NGC image `nvcr.io/nvidia/tritonserver:24.10-py3`): used as is, with its own backends;
- else the binary inside the `nvidia-pytriton` wheel (Triton 2.51.0). Its python backend needs a stub
  built for the running Python: we assemble a backend folder (libtriton_python.so, the utils module
  and the stub for this Python version) and point `--backend-directory` at it.
The Python stubs find this package through PYTHONPATH and the weights through $MINIGPT5_WEIGHTS.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

from .runtime import DEVICE_ENV, WEIGHTS_ENV

REPOSITORY = Path(__file__).resolve().parents[2] / "model_repository"
EXIT_TIMEOUT_S = 30  # tritonserver's --exit-timeout-secs: in-flight requests get this long on shutdown


@dataclass
class TritonBinary:
    executable: Path
    backend_source: Path | None = None  # pytriton's backends/python (None: the binary's own backends)
    libraries: list[Path] = field(default_factory=list)


def find_tritonserver() -> TritonBinary:
    on_path = shutil.which("tritonserver")
    if on_path:
        return TritonBinary(Path(on_path))
    try:
        import pytriton
    except ImportError:
        raise RuntimeError("tritonserver not found: not on PATH and nvidia-pytriton is not installed "
                           "(pip install 'minigpt5-triton[server]')") from None
    root = Path(pytriton.__file__).resolve().parent
    libs = root.parent / "nvidia_pytriton.libs"
    return TritonBinary(root / "tritonserver" / "bin" / "tritonserver", root / "tritonserver" / "backends" / "python",
                        [libs] if libs.is_dir() else [])


def prepare_backend_dir(binary: TritonBinary, workdir: Path) -> Path | None:
    """A backend directory whose python backend has the stub of this Python (pytriton case only)."""
    if binary.backend_source is None:
        return None
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = binary.backend_source.parents[1] / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise RuntimeError(f"nvidia-pytriton has no python-backend stub for Python {version}")
    target = workdir / "backends" / "python"
    target.mkdir(parents=True, exist_ok=True)
    for source in (binary.backend_source / "libtriton_python.so",
                   binary.backend_source / "triton_python_backend_utils.py", stub):
        link = target / source.name
        if not link.exists():
            link.symlink_to(source)
    return workdir / "backends"


def server_environment(binary: TritonBinary, weights: Path, device: str) -> dict:
    env = dict(os.environ)
    libs = [str(p) for p in binary.libraries] + [sysconfig.get_config_var("LIBDIR") or ""]
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in libs + _split(env.get("LD_LIBRARY_PATH")) if p)
    # The stub embeds Python and takes its site-packages from the `python3` first on PATH.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    # Four stub processes share the CPU cores: idle OpenMP workers must sleep, not spin.
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    env[WEIGHTS_ENV] = str(weights)
    if device != "auto":
        env[DEVICE_ENV] = device
    return env


def check_installed() -> None:
    """The stubs run in the Python found first on PATH (this one) and ignore PYTHONPATH, so the
    package must be installed in it (`pip install -e .` or `pip install .[server]`)."""
    try:
        metadata.distribution("minigpt5-triton")
    except metadata.PackageNotFoundError:
        raise RuntimeError(f"minigpt5-triton is not installed in {sys.prefix}; the Triton python stubs could "
                           f"not import it. Run `pip install -e '.[server]'` (or `make serve`).") from None


def _split(value: str | None) -> list[str]:
    return [p for p in (value or "").split(os.pathsep) if p]


class TritonProcess:
    """One tritonserver process serving the MiniGPT-5 repository."""

    def __init__(self, weights: Path, *, http_port=8000, grpc_port=8001, metrics_port=8002, host="0.0.0.0",
                 device="auto", workdir: Path | None = None, log_verbose=0, extra_args=(), log_file=None):
        self.weights = Path(weights).resolve()
        self.http_port, self.grpc_port, self.metrics_port = http_port, grpc_port, metrics_port
        self.host = host
        self.device = device
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="minigpt5-triton-"))
        self.log_verbose = log_verbose
        self.extra_args = list(extra_args)
        self.log_file = log_file
        self.process: subprocess.Popen | None = None

    def command(self, binary: TritonBinary) -> list[str]:
        cmd = [str(binary.executable), f"--model-repository={REPOSITORY}",
               f"--http-port={self.http_port}", f"--grpc-port={self.grpc_port}",
               f"--metrics-port={self.metrics_port}", f"--http-address={self.host}",
               f"--grpc-address={self.host}", "--allow-metrics=true",
               f"--exit-timeout-secs={EXIT_TIMEOUT_S}", f"--log-verbose={self.log_verbose}"]
        backends = prepare_backend_dir(binary, self.workdir)
        if backends:
            cmd.append(f"--backend-directory={backends}")
        return cmd + self.extra_args

    def start(self) -> "TritonProcess":
        check_installed()
        binary = find_tritonserver()
        output = open(self.log_file, "ab") if self.log_file else None
        self.process = subprocess.Popen(self.command(binary), env=server_environment(binary, self.weights, self.device),
                                        stdout=output, stderr=subprocess.STDOUT if output else None,
                                        start_new_session=True)
        return self

    def wait_ready(self, timeout: float = 300.0) -> None:
        url = f"http://127.0.0.1:{self.http_port}/v2/health/ready"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"tritonserver exited with code {self.process.returncode} before it was ready")
            try:
                with urllib.request.urlopen(url, timeout=2) as reply:
                    if reply.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.5)
        raise TimeoutError(f"tritonserver not ready after {timeout:.0f}s ({url})")

    def stop(self, timeout: float = EXIT_TIMEOUT_S + 15) -> int | None:
        """SIGTERM (Triton drains in-flight requests), then SIGKILL of the whole process group."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                pass
        self._kill_group()  # python stubs left behind by a crashed or hung server
        return self.process.wait()

    def _kill_group(self) -> None:
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def serve_forever(args) -> int:
    from ..cli import resolve_weights

    weights = resolve_weights(args.weights)
    server = TritonProcess(weights, http_port=args.http_port, grpc_port=args.grpc_port,
                           metrics_port=args.metrics_port, host=args.host, device=args.device,
                           workdir=args.workdir, log_verbose=args.log_verbose, extra_args=args.tritonserver_args)
    print(f"minigpt5: starting tritonserver on weights {weights}", file=sys.stderr, flush=True)
    stopping = False

    def on_signal(signum, _frame):
        nonlocal stopping
        stopping = True
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    try:
        server.start()
        server.wait_ready()
        _print_endpoints(args)
        return server.process.wait() if server.process else 1
    except KeyboardInterrupt:
        print("\nminigpt5: stopping tritonserver ...", file=sys.stderr, flush=True)
        return 0
    finally:
        code = server.stop()
        if stopping or code is not None:
            print(f"minigpt5: tritonserver stopped (exit code {code})", file=sys.stderr, flush=True)


def _print_endpoints(args) -> None:
    host = "localhost" if args.host in ("0.0.0.0", "::") else args.host
    print(f"""
MiniGPT-5 is ready.
  HTTP     http://{host}:{args.http_port}   (/v2/models/minigpt5/generate, /generate_stream)
  gRPC     {host}:{args.grpc_port}          (streaming; `minigpt5 generate --url {host}:{args.grpc_port}`)
  metrics  http://{host}:{args.metrics_port}/metrics

Try it:
  curl -sN -X POST http://{host}:{args.http_port}/v2/models/minigpt5/generate_stream \\
       -d '{{"text_input": "Tell me a story about a cat.", "stream": true, "force_image": true, "max_tokens": 48}}'

Ctrl-C stops the server.""", flush=True)
