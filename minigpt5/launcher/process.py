"""One tritonserver process serving the MiniGPT-5 repository: its command line, start, readiness, stop,
and a watchdog over its python-backend stubs.

Security defaults (docs/RELIABILITY.md): model control stays off (`--model-control-mode=none`), and
the APIs that change the server or name files on it (model repository, shared memory, trace,
logging) are refused on HTTP and gRPC unless the request carries the `minigpt5-admin-key` header
with the admin key (`--admin-key` / $MINIGPT5_ADMIN_KEY; without one, a random key nobody knows).

Start and stop at real size: wait_ready has no deadline unless given one (loading the real weights
takes minutes; the orchestrator's startup probe is the deadline) and reports every LOADING_REPORT_S
which models are still loading, read from tritonserver's log as TritonProcess copies it through
(log.py: Triton opens its ports only once every model has loaded). stop() drains first (drain.py),
then stops tritonserver, and kills what is left only after the effective --exit-timeout-secs (ours,
or the operator's after `--`) plus UNLOAD_MARGIN_S.

Stub watchdog: Triton 2.51 never restarts a python-backend stub that died (kill -9, OOM killer) and
keeps reporting the model ready; requests in flight in it hang forever. Once the server is ready,
TritonProcess watches the stub processes and, when one dies, stops tritonserver (SIGTERM, then
SIGKILL after `crash_grace_s`) so that every client gets an error at once and the orchestrator
(Kubernetes, docker, systemd) restarts the server; `minigpt5 serve` then exits with code 3.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from . import drain
from .binary import TritonBinary, check_installed, find_tritonserver, prepare_backend_dir, server_environment
from .contract import request_shutdown
from .log import LogFollower
from .repository import prepare_repository

EXIT_TIMEOUT_S = 30  # tritonserver's --exit-timeout-secs: in-flight requests get this long on shutdown
# After --exit-timeout-secs Triton still unloads the models and the stubs exit: stop() waits this much
# longer before it kills the process group. Orchestrators must allow exit timeout + this margin.
UNLOAD_MARGIN_S = 20
LOADING_REPORT_S = 30.0  # while models load, wait_ready reports what is still loading this often
ADMIN_KEY_ENV = "MINIGPT5_ADMIN_KEY"
ADMIN_HEADER = "minigpt5-admin-key"
# Refused without the admin header: they load/unload models or read/write files and memory on the
# server (repository control, shared-memory registration, trace files, log settings).
RESTRICTED_APIS = ("model-repository", "shared-memory", "trace", "logging")
WATCHDOG_POLL_S = 1.0  # how often the stub processes are checked once the server is ready
CRASH_GRACE_S = 5.0  # after a stub died: SIGTERM, then SIGKILL of the whole group after this long


def _flag_value(args: list[str], flag: str) -> str | None:
    """The value of `--flag=value` or `--flag value` in a command line, if present."""
    for index, arg in enumerate(args):
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
        if arg == flag and index + 1 < len(args):
            return args[index + 1]
    return None


def check_weights(weights: Path) -> None:
    """A weights directory the stubs can load (manifest and every module file), checked before
    tritonserver starts: otherwise each stub fails on its own, deep in the server log."""
    from ..weights.layout import WeightsDir

    WeightsDir(weights)


def security_args(admin_key: str | None, extra_args: list[str]) -> list[str]:
    """Restrict the control APIs on both protocols to requests carrying the admin header, unless the
    operator restricts them differently in the extra tritonserver flags."""
    key = admin_key or secrets.token_urlsafe(32)  # no key given: nobody can use those APIs
    if not re.fullmatch(r"[A-Za-z0-9._~+/-]+", key):
        raise ValueError("the admin key may hold only letters, digits and . _ ~ + / -")
    apis = ",".join(RESTRICTED_APIS)
    args = ["--model-control-mode=none"]
    if not any(a.startswith("--http-restricted-api") for a in extra_args):
        args.append(f"--http-restricted-api={apis}:{ADMIN_HEADER}={key}")
    if not any(a.startswith("--grpc-restricted-protocol") for a in extra_args):
        args.append(f"--grpc-restricted-protocol={apis}:{ADMIN_HEADER}={key}")
    return args


# ---- python-backend stub processes ----------------------------------------------------------------
def stub_processes(server_pid: int) -> dict[int, str]:
    """The live python-backend stubs of a tritonserver, {pid: model name}, read from /proc (Linux).
    A stub's first argument is its model.py (`<repository>/<model>/<version>/model.py`); zombies
    (killed stubs that tritonserver never reaps) do not count."""
    stubs = {}
    for pid in _children(server_pid):
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except (OSError, IndexError):
            continue  # gone meanwhile
        if state in ("Z", "X") or len(argv) < 2 or not argv[1].endswith(b"model.py"):
            continue
        stubs[pid] = Path(os.fsdecode(argv[1])).parent.parent.name
    return stubs


def _children(pid: int) -> list[int]:
    try:  # /proc/PID/task/TID/children lists the children each thread forked (CONFIG_PROC_CHILDREN)
        return [int(c) for task in Path(f"/proc/{pid}/task").iterdir() for c in (task / "children").read_text().split()]
    except (OSError, ValueError):
        pass
    children = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    children.append(int(entry.name))
            except (OSError, IndexError, ValueError):
                continue
    return children


class TritonProcess:
    """One tritonserver process serving the MiniGPT-5 repository.

    `parameters`: {model: {key: value}} overrides of config.pbtxt `parameters` (applied to the copy
    of the repository served from `workdir`). `admin_key`: the `minigpt5-admin-key` header value that unlocks
    the restricted APIs (default $MINIGPT5_ADMIN_KEY; none: they are refused to everyone).
    `watchdog`: once ready, stop the server when a model's stub process dies (`crash` then says which)."""

    def __init__(
        self,
        weights: Path,
        *,
        http_port=8000,
        grpc_port=8001,
        metrics_port=8002,
        host="0.0.0.0",
        device="auto",
        workdir: Path | None = None,
        log_verbose=0,
        extra_args=(),
        log_file=None,
        parameters: dict[str, dict[str, str]] | None = None,
        admin_key: str | None = None,
        watchdog: bool = True,
        crash_grace_s: float = CRASH_GRACE_S,
        repository: Path | None = None,
    ):
        self.weights = Path(weights).resolve()
        self.http_port, self.grpc_port, self.metrics_port = http_port, grpc_port, metrics_port
        self.host = host
        self.device = device
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="minigpt5-triton-"))
        self.log_verbose = log_verbose
        self.extra_args = list(extra_args)
        self.log_file = log_file
        self.parameters = parameters or {}
        self.admin_key = admin_key if admin_key is not None else os.environ.get(ADMIN_KEY_ENV) or None
        self.source_repository = Path(repository) if repository else None  # None: REPOSITORY
        self.repository: Path | None = None  # what is served: the copy in `workdir`
        self.watchdog = watchdog
        self.crash_grace_s = crash_grace_s
        self.crash: str | None = None  # why the watchdog stopped the server, if it did
        self._stopping = False  # stop() was called: stubs going away are expected
        self.process: subprocess.Popen | None = None
        self.log: LogFollower | None = None  # copies tritonserver's output, follows model loading
        # Triton's server id (`GET /v2` "name"): tells our server from another one on the same port
        self._id_given = _flag_value(self.extra_args, "--id")  # the operator's own --id, passed as is
        self.server_id = self._id_given or f"minigpt5-{secrets.token_hex(4)}"

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"  # tritonclient's form: host:port

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def command(self, binary: TritonBinary) -> list[str]:
        if self.repository is None:
            self.repository = prepare_repository(self.workdir, self.parameters, self.source_repository)
        cmd = [
            str(binary.executable),
            f"--model-repository={self.repository}",
            f"--http-port={self.http_port}",
            f"--grpc-port={self.grpc_port}",
            f"--metrics-port={self.metrics_port}",
            f"--http-address={self.host}",
            f"--grpc-address={self.host}",
            "--allow-metrics=true",
            f"--exit-timeout-secs={EXIT_TIMEOUT_S}",
            f"--log-verbose={self.log_verbose}",
        ]
        if not self._id_given:
            cmd.append(f"--id={self.server_id}")
        backends = prepare_backend_dir(binary, self.workdir)
        if backends:
            cmd.append(f"--backend-directory={backends}")
        return cmd + security_args(self.admin_key, self.extra_args) + self.extra_args

    @property
    def exit_timeout_s(self) -> int:
        """The effective --exit-timeout-secs: the operator's (later on the command line, so it wins) or ours."""
        given = _flag_value(self.extra_args, "--exit-timeout-secs")
        try:
            return int(given) if given is not None else EXIT_TIMEOUT_S
        except ValueError:
            raise ValueError(f"--exit-timeout-secs={given}: expected a whole number of seconds") from None

    def start(self) -> TritonProcess:
        check_installed()
        check_weights(self.weights)
        _ = self.exit_timeout_s  # a malformed operator value fails here, not at shutdown
        binary = find_tritonserver()
        sink = open(self.log_file, "ab") if self.log_file else sys.stderr.buffer
        self.crash = None  # a restarted server starts with a clean record
        self._stopping = False
        self.process = subprocess.Popen(
            self.command(binary),
            env=server_environment(binary, self.weights, self.device),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.log = LogFollower(self.process.stdout, sink, owns_sink=bool(self.log_file))
        return self

    def wait_ready(self, timeout: float | None = None, report=None) -> None:
        """Until our server (not another one on the same port) reports ready. `timeout`: seconds, None = no
        deadline. `report(line)`: called every LOADING_REPORT_S with the models still loading."""
        base = f"http://127.0.0.1:{self.http_port}/v2"
        started = time.monotonic()
        next_report = started + LOADING_REPORT_S
        process = self._started()
        while timeout is None or time.monotonic() - started < timeout:
            if process.poll() is not None:
                raise RuntimeError(
                    f"tritonserver exited with code {process.returncode} before it was ready "
                    f"(a model failed to load, or ports {self.http_port}/{self.grpc_port}/"
                    f"{self.metrics_port} are taken: its log says which)"
                )
            if self._ready(base):
                if self.watchdog:
                    self._start_watchdog()
                return
            if report is not None and time.monotonic() >= next_report:
                next_report += LOADING_REPORT_S
                report(self._loading_line(time.monotonic() - started))
            time.sleep(0.5)
        raise TimeoutError(f"tritonserver not ready after {timeout:.0f}s ({base}/health/ready): {self.loading_state()}")

    def _ready(self, base: str) -> bool:
        try:
            with urllib.request.urlopen(f"{base}/health/ready", timeout=2) as reply:
                ready = reply.status == 200
            with urllib.request.urlopen(base, timeout=2) as reply:
                return ready and json.loads(reply.read()).get("name") == self.server_id
        except (urllib.error.URLError, ConnectionError, TimeoutError, ValueError):
            return False

    def models(self) -> list[str]:
        """The served models (those of the repository copy)."""
        return sorted(p.parent.name for p in self.repository.glob("*/config.pbtxt")) if self.repository else []

    def loading_state(self) -> str:
        """Which models are loaded, loading, failed or waiting, as tritonserver's log reports them."""
        return self.log.state(self.models()) if self.log else "not started"

    def _loading_line(self, elapsed: float) -> str:
        return f"minigpt5: loading models ({elapsed:.0f} s): {self.loading_state()}"

    def stop(self, timeout: float | None = None, report=None) -> int | None:
        """Drain, then SIGTERM, then SIGKILL of the whole process group. Draining: `minigpt5` refuses
        new requests and the ones in flight get up to the effective exit timeout to finish (drain.py says
        why Triton cannot do this itself). Then tritonserver gets SIGTERM and exits (Triton also waits
        for open HTTP connections), and the kill comes at `timeout` after the call: by default the
        effective exit timeout + UNLOAD_MARGIN_S. `report(line)` hears about the drain."""
        if self.process is None:
            return None
        self._stopping = True
        if self.process.poll() is None:
            started = time.monotonic()
            deadline = started + (self.exit_timeout_s + UNLOAD_MARGIN_S if timeout is None else timeout)
            self._drain(min(deadline, started + self.exit_timeout_s), report)
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        self._kill_group()  # python stubs left behind by a crashed or hung server
        code = self.process.wait()
        if self.log:
            self.log.close()
        return code

    def _drain(self, deadline: float, report=None) -> None:
        public = self.repository / "minigpt5" if self.repository else None
        if public is None or not public.is_dir():
            return  # not our repository (a test's own models): nothing to drain
        request_shutdown(public)
        process = self._started()
        drain.wait_drained(self.metrics_url, deadline, report, alive=lambda: process.poll() is None)

    def stubs(self) -> dict[int, str]:
        """The live python-backend stub processes of this server, {pid: model}."""
        return stub_processes(self.process.pid) if self.process else {}

    def _start_watchdog(self) -> None:
        expected = self.stubs()
        if not expected:
            return  # no /proc or no python stubs: nothing to watch
        threading.Thread(
            target=self._watch, args=(self.process, expected), name="minigpt5-stub-watchdog", daemon=True
        ).start()

    def _watch(self, process: subprocess.Popen, expected: dict[int, str]) -> None:
        while process.poll() is None and not self._stopping:
            time.sleep(WATCHDOG_POLL_S)
            alive = stub_processes(process.pid)
            dead = sorted({model for pid, model in expected.items() if pid not in alive})
            if dead and process.poll() is None and not self._stopping and process is self.process:
                self.crash = (
                    f"the python stub of model {', '.join(dead)} died; Triton 2.51 neither restarts it "
                    f"nor reports the model unready, so tritonserver was stopped to be restarted"
                )
                print(f"minigpt5: {self.crash}", file=sys.stderr, flush=True)
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout=self.crash_grace_s)
                except subprocess.TimeoutExpired:
                    pass
                self._kill_group()
                return

    def kill(self) -> None:
        """SIGKILL of tritonserver and its stubs now (stop() then returns at once)."""
        if self.process is not None:
            self._kill_group()

    def _started(self) -> subprocess.Popen:
        if self.process is None:
            raise RuntimeError("tritonserver has not been started")
        return self.process

    def _kill_group(self) -> None:
        try:
            os.killpg(self._started().pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
