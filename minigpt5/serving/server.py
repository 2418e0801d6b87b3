"""`minigpt5 serve`: run the real tritonserver on `model_repository/`.

Where tritonserver comes from:
- on PATH (the NGC image `nvcr.io/nvidia/tritonserver:24.10-py3`): used as is, with its own backends;
- else the binary inside the `nvidia-pytriton` wheel (Triton 2.51.0). Its python backend needs a stub
  built for the running Python: we assemble a backend folder (libtriton_python.so, the utils module
  and the stub for this Python version) and point `--backend-directory` at it.
The Python stubs find this package through PYTHONPATH and the weights through $MINIGPT5_WEIGHTS.

Security defaults (docs/RELIABILITY.md): model control stays off (`--model-control-mode=none`), and
the APIs that change the server or name files on it (model repository, shared memory, trace,
logging) are refused on HTTP and gRPC unless the request carries the `minigpt5-admin-key` header
with the admin key (`--admin-key` / $MINIGPT5_ADMIN_KEY; without one, a random key nobody knows).

The served repository is a copy in the work directory holding only the model directories.
Parameter overrides: `parameters={"minigpt5": {"max_inflight_requests": "4"}}` (or `minigpt5 serve
--param minigpt5.max_inflight_requests=4`) rewrite those `parameters` values of the copied
config.pbtxt; the repository itself is never edited.

Start and stop at real size: wait_ready has no deadline unless given one (loading the real weights
takes minutes; the orchestrator's startup probe is the deadline) and reports every LOADING_REPORT_S
which models are still loading, read from tritonserver's log as TritonProcess copies it through
(server_log.py: Triton opens its ports only once every model has loaded). stop() waits for the
effective --exit-timeout-secs (ours, or the operator's after `--`) plus UNLOAD_MARGIN_S before it
kills anything.

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
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

from . import drain
from .runtime import DEVICE_ENV, WEIGHTS_ENV
from .server_log import LogFollower

REPOSITORY = Path(__file__).resolve().parents[2] / "model_repository"
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
EXIT_STUB_DIED = 3  # `minigpt5 serve` exit code when it stopped the server because a stub died


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


def _flag_value(args: list[str], flag: str) -> str | None:
    """The value of `--flag=value` or `--flag value` in a command line, if present."""
    for index, arg in enumerate(args):
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
        if arg == flag and index + 1 < len(args):
            return args[index + 1]
    return None


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


def check_weights(weights: Path) -> None:
    """A weights directory the stubs can load (manifest and every module file), checked before
    tritonserver starts: otherwise each stub fails on its own, deep in the server log."""
    from ..weights.layout import WeightsDir
    WeightsDir(weights)


def _split(value: str | None) -> list[str]:
    return [p for p in (value or "").split(os.pathsep) if p]


# ---- config.pbtxt parameter overrides ---------------------------------------------------------------
_PARAMETER = re.compile(
    r'\bkey\s*:\s*"(?P<key>[^"\\]+)"\s*,?\s*value\s*:?\s*\{\s*string_value\s*:\s*'
    r'"(?P<value>(?:[^"\\\n]|\\.)*)"')


def config_parameters(config_text: str) -> dict[str, str]:
    """The `parameters` string values of a config.pbtxt (comments ignored)."""
    return {m["key"]: m["value"] for m in _PARAMETER.finditer(_without_comments(config_text))}


def rewrite_parameters(config_text: str, values: dict[str, str], model: str = "model") -> str:
    """config.pbtxt text with the string values of existing `parameters` keys replaced. Unknown keys
    and values that cannot be a plain pbtxt string are refused (nothing is added, nothing else moves)."""
    known = config_parameters(config_text)
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ValueError(f"{model}: no parameter {', '.join(unknown)} in its config.pbtxt "
                         f"(known: {', '.join(sorted(known))})")
    for key, value in values.items():
        if not isinstance(value, str) or any(c in value for c in '"\\\n\r'):
            raise ValueError(f"{model}.{key}: the value must be a string without quotes, backslashes or "
                             f"newlines, got {value!r}")
    # Comments are blanked out (same length) only to find the entries; the text keeps them.
    matches = [m for m in _PARAMETER.finditer(_without_comments(config_text)) if m["key"] in values]
    for m in reversed(matches):
        start, end = m.span("value")
        config_text = config_text[:start] + values[m["key"]] + config_text[end:]
    return config_text


def _without_comments(text: str) -> str:
    """`#` comments blanked with spaces (outside strings), so offsets stay those of `text`."""
    out, in_string, in_comment, escaped = [], False, False, False
    for c in text:
        if in_comment:
            in_comment = c != "\n"
            out.append(c if c == "\n" else " ")
            continue
        if in_string:
            in_string = escaped or c != '"'
            escaped = (not escaped) and c == "\\"
        elif c == '"':
            in_string = True
        elif c == "#":
            in_comment = True
            out.append(" ")
            continue
        out.append(c)
    return "".join(out)


def prepare_repository(workdir: Path, parameters: dict[str, dict[str, str]] | None,
                       source: Path | None = None) -> Path:
    """The repository to serve: a copy in `workdir` of the models in `source` (default REPOSITORY)
    with `parameters` applied. Only directories holding a config.pbtxt are copied: a model directory
    left behind by an older checkout (its __pycache__ survives `git pull`) would make Triton refuse
    to start, and the stubs' __pycache__ stays out of the source tree."""
    source = Path(source or REPOSITORY)
    parameters = parameters or {}
    models = sorted(p.parent.name for p in source.glob("*/config.pbtxt"))
    unknown = sorted(set(parameters) - set(models))
    if unknown:
        raise ValueError(f"no model {', '.join(unknown)} in {source} (models: {', '.join(models)})")
    # Check every override before copying anything.
    rewritten = {model: rewrite_parameters((source / model / "config.pbtxt").read_text(), {
        k: str(v) for k, v in values.items()}, model) for model, values in parameters.items()}
    target = workdir / "model_repository"
    if target.exists():
        shutil.rmtree(target)
    for model in models:
        shutil.copytree(source / model, target / model, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for model, text in rewritten.items():
        (target / model / "config.pbtxt").write_text(text)
    return target


def parse_parameter_flags(flags: list[str]) -> dict[str, dict[str, str]]:
    """`MODEL.KEY=VALUE` strings (serve's --param) as {model: {key: value}}."""
    parameters: dict[str, dict[str, str]] = {}
    for flag in flags:
        name, sep, value = flag.partition("=")
        model, dot, key = name.strip().partition(".")
        if not sep or not dot or not model or not key:
            raise ValueError(f"--param {flag!r}: expected MODEL.KEY=VALUE, e.g. minigpt5.max_inflight_requests=8")
        parameters.setdefault(model, {})[key] = value
    return parameters


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
        return [int(c) for task in Path(f"/proc/{pid}/task").iterdir()
                for c in (task / "children").read_text().split()]
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

    def __init__(self, weights: Path, *, http_port=8000, grpc_port=8001, metrics_port=8002, host="0.0.0.0",
                 device="auto", workdir: Path | None = None, log_verbose=0, extra_args=(), log_file=None,
                 parameters: dict[str, dict[str, str]] | None = None, admin_key: str | None = None,
                 watchdog: bool = True, crash_grace_s: float = CRASH_GRACE_S, repository: Path | None = None):
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

    def command(self, binary: TritonBinary) -> list[str]:
        if self.repository is None:
            self.repository = prepare_repository(self.workdir, self.parameters, self.source_repository)
        cmd = [str(binary.executable), f"--model-repository={self.repository}",
               f"--http-port={self.http_port}", f"--grpc-port={self.grpc_port}",
               f"--metrics-port={self.metrics_port}", f"--http-address={self.host}",
               f"--grpc-address={self.host}", "--allow-metrics=true",
               f"--exit-timeout-secs={EXIT_TIMEOUT_S}", f"--log-verbose={self.log_verbose}"]
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

    def start(self) -> "TritonProcess":
        check_installed()
        check_weights(self.weights)
        self.exit_timeout_s  # a malformed operator value fails here, not at shutdown
        binary = find_tritonserver()
        sink = open(self.log_file, "ab") if self.log_file else sys.stderr.buffer
        self.crash = None  # a restarted server starts with a clean record
        self._stopping = False
        self.process = subprocess.Popen(self.command(binary), env=server_environment(binary, self.weights, self.device),
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        self.log = LogFollower(self.process.stdout, sink, owns_sink=bool(self.log_file))
        return self

    def wait_ready(self, timeout: float | None = None, report=None) -> None:
        """Until our server (not another one on the same port) reports ready. `timeout`: seconds, None = no
        deadline. `report(line)`: called every LOADING_REPORT_S with the models still loading."""
        base = f"http://127.0.0.1:{self.http_port}/v2"
        started = time.monotonic()
        next_report = started + LOADING_REPORT_S
        while timeout is None or time.monotonic() - started < timeout:
            if self.process.poll() is not None:
                raise RuntimeError(f"tritonserver exited with code {self.process.returncode} before it was ready "
                                   f"(a model failed to load, or ports {self.http_port}/{self.grpc_port}/"
                                   f"{self.metrics_port} are taken: its log says which)")
            if self._ready(base):
                if self.watchdog:
                    self._start_watchdog()
                return
            if report is not None and time.monotonic() >= next_report:
                next_report += LOADING_REPORT_S
                report(self._loading_line(time.monotonic() - started))
            time.sleep(0.5)
        raise TimeoutError(f"tritonserver not ready after {timeout:.0f}s ({base}/health/ready): "
                           f"{self.loading_state()}")

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
        drain.request_shutdown(public)
        drain.wait_drained(f"http://127.0.0.1:{self.metrics_port}/metrics", deadline, report,
                           alive=lambda: self.process.poll() is None)

    def stubs(self) -> dict[int, str]:
        """The live python-backend stub processes of this server, {pid: model}."""
        return stub_processes(self.process.pid) if self.process else {}

    def _start_watchdog(self) -> None:
        expected = self.stubs()
        if not expected:
            return  # no /proc or no python stubs: nothing to watch
        threading.Thread(target=self._watch, args=(self.process, expected), name="minigpt5-stub-watchdog",
                         daemon=True).start()

    def _watch(self, process: subprocess.Popen, expected: dict[int, str]) -> None:
        while process.poll() is None and not self._stopping:
            time.sleep(WATCHDOG_POLL_S)
            alive = stub_processes(process.pid)
            dead = sorted({model for pid, model in expected.items() if pid not in alive})
            if dead and process.poll() is None and not self._stopping and process is self.process:
                self.crash = (f"the python stub of model {', '.join(dead)} died; Triton 2.51 neither restarts it "
                              f"nor reports the model unready, so tritonserver was stopped to be restarted")
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

    def _kill_group(self) -> None:
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def serve_forever(args) -> int:
    from ..weights.tiny import resolve_weights

    try:
        parameters = parse_parameter_flags(getattr(args, "param", None) or [])
        if parameters:  # fail on an unknown model or key before loading anything
            with tempfile.TemporaryDirectory(prefix="minigpt5-check-") as scratch:
                prepare_repository(Path(scratch), parameters)
    except ValueError as exc:
        print(f"minigpt5 serve: {exc}", file=sys.stderr)
        return 2
    weights = resolve_weights(args.weights)
    try:
        check_weights(weights)
    except (OSError, ValueError) as exc:
        print(f"minigpt5 serve: weights {weights}: {exc}", file=sys.stderr)
        return 2
    server = TritonProcess(weights, http_port=args.http_port, grpc_port=args.grpc_port,
                           metrics_port=args.metrics_port, host=args.host, device=args.device,
                           workdir=args.workdir, log_verbose=args.log_verbose, extra_args=args.tritonserver_args,
                           parameters=parameters, admin_key=getattr(args, "admin_key", None))
    print(f"minigpt5: starting tritonserver on weights {weights}", file=sys.stderr, flush=True)
    stopping = False

    def on_signal(signum, _frame):
        nonlocal stopping
        stopping = True
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    try:
        server.start()
        server.wait_ready(getattr(args, "ready_timeout", None), report=_say)
        _print_endpoints(args)
        code = server.process.wait() if server.process else 1
        return EXIT_STUB_DIED if server.crash else code
    except KeyboardInterrupt:
        print(f"\nminigpt5: stopping tritonserver (requests in flight get up to {server.exit_timeout_s} s) ...",
              file=sys.stderr, flush=True)
        return 0
    except (RuntimeError, TimeoutError, ValueError) as exc:
        print(f"minigpt5 serve: {exc}", file=sys.stderr, flush=True)
        return 1
    finally:
        _second_signal_kills(server)
        code = server.stop(report=_say)
        if stopping or code is not None:
            print(f"minigpt5: tritonserver stopped (exit code {code})", file=sys.stderr, flush=True)


def _second_signal_kills(server: TritonProcess) -> None:
    """While stop() waits for the requests in flight, another Ctrl-C or SIGTERM kills the server at once
    (instead of interrupting the wait and leaving tritonserver running in its own session)."""
    def kill_now(signum, _frame):
        print("minigpt5: killing tritonserver now", file=sys.stderr, flush=True)
        server.kill()
    signal.signal(signal.SIGTERM, kill_now)
    signal.signal(signal.SIGINT, kill_now)


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


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
