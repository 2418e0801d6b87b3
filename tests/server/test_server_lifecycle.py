"""`minigpt5 serve`'s start and stop at real size, on a test repository whose model takes its time:
readiness has no deadline unless given one and says which models are still loading; stop() waits
for the effective --exit-timeout-secs before it kills anything; a bad weights directory is refused
before tritonserver starts."""

from __future__ import annotations

import concurrent.futures
import http.client
import json
import signal
import subprocess
import sys
import threading
import time
import urllib.request

import pytest

from minigpt5 import cli
from minigpt5.launcher import process as server
from minigpt5.launcher.local import free_port, local_process
from minigpt5.launcher.process import TritonProcess

SLOW_CONFIG = """name: "slow"
backend: "python"
max_batch_size: 0
input [ { name: "text_input", data_type: TYPE_STRING, dims: [ 1 ] } ]
output [ { name: "text_output", data_type: TYPE_STRING, dims: [ 1 ] } ]
instance_group [ { count: 1, kind: KIND_CPU } ]
parameters [ { key: "load_s", value: { string_value: "LOAD_S" } }, { key: "run_s", value: { string_value: "RUN_S" } } ]
"""
SLOW_MODEL = '''import json
import time

import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    """Loads in `load_s` seconds (the real weights take minutes) and answers in `run_s`."""

    def initialize(self, args):
        parameters = json.loads(args["model_config"])["parameters"]
        self.run_s = float(parameters["run_s"]["string_value"])
        time.sleep(float(parameters["load_s"]["string_value"]))

    def execute(self, requests):
        time.sleep(self.run_s)
        return [pb_utils.InferenceResponse([pb_utils.Tensor(
            "text_output", pb_utils.get_input_tensor_by_name(r, "text_input").as_numpy())]) for r in requests]
'''


def slow_repository(root, load_s: float, run_s: float):
    """Two models: `slow` (loads in load_s) and `quick` (the same, loading at once)."""
    repository = root / "repository"
    for name, load in (("slow", load_s), ("quick", 0)):
        model = repository / name
        (model / "1").mkdir(parents=True)
        config = SLOW_CONFIG.replace('"slow"', f'"{name}"').replace("LOAD_S", str(load)).replace("RUN_S", str(run_s))
        (model / "config.pbtxt").write_text(config)
        (model / "1" / "model.py").write_text(SLOW_MODEL)
    return repository


def generate(process: TritonProcess, model: str, text: str) -> dict:
    request = urllib.request.Request(
        f"http://127.0.0.1:{process.http_port}/v2/models/{model}/generate",
        data=json.dumps({"text_input": text}).encode(),
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=60) as reply:
        return json.loads(reply.read())


def slow_server(tmp_path, weights, load_s: float, run_s: float = 0.0, extra_args=()) -> TritonProcess:
    repository = slow_repository(tmp_path, load_s, run_s)
    return local_process(weights, workdir=tmp_path / "server", repository=repository, extra_args=extra_args)


@pytest.mark.server
def test_readiness_has_no_deadline_and_says_what_is_still_loading(tmp_path, tiny_weights, monkeypatch):
    monkeypatch.setattr(server, "LOADING_REPORT_S", 1.0)
    process = slow_server(tmp_path, tiny_weights, load_s=15)
    reports = []
    try:
        process.start()
        with pytest.raises(TimeoutError, match="loading slow; loaded quick"):  # a deadline, when given
            process.wait_ready(timeout=8)
        process.wait_ready(report=reports.append)  # none by default: returns once `slow` has loaded
        assert process.loading_state() == "loaded quick, slow"
    finally:
        process.stop()
    assert any("loading slow; loaded quick" in line for line in reports), reports


@pytest.mark.server
def test_stop_waits_for_the_operators_exit_timeout(tmp_path, tiny_weights, monkeypatch):
    """Our own exit timeout made 1 s with no margin: a stop() that ignored the operator's 30 s (after
    `--`) would kill the server while its 6-second answer is still running."""
    monkeypatch.setattr(server, "EXIT_TIMEOUT_S", 1)
    monkeypatch.setattr(server, "UNLOAD_MARGIN_S", 0)
    process = slow_server(tmp_path, tiny_weights, load_s=0, run_s=6, extra_args=["--exit-timeout-secs=30"])
    assert process.exit_timeout_s == 30
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        try:
            process.start()
            process.wait_ready(timeout=120)
            answer = pool.submit(generate, process, "slow", "still here")
            time.sleep(2)  # the answer is running
            assert not answer.done()
        finally:
            code = process.stop()
        assert answer.result(timeout=30)["text_output"] == "still here"
    assert code == 0, "tritonserver was killed instead of draining"


def test_the_operators_exit_timeout_wins_and_a_malformed_one_is_refused(tmp_path, tiny_weights):
    assert TritonProcess(tiny_weights).exit_timeout_s == server.EXIT_TIMEOUT_S
    assert TritonProcess(tiny_weights, extra_args=["--exit-timeout-secs", "90"]).exit_timeout_s == 90
    with pytest.raises(ValueError, match="--exit-timeout-secs=soon"):
        TritonProcess(tiny_weights, workdir=tmp_path, extra_args=["--exit-timeout-secs=soon"]).start()


@pytest.mark.parametrize("layout, message", [(None, "no manifest.json"), ("vae", "missing vae.safetensors")])
def test_serve_refuses_a_bad_weights_directory_before_starting(tmp_path, tiny_weights, capsys, layout, message):
    weights = tmp_path / "weights"
    if layout:  # a copy of the tiny weights without one module file
        import shutil

        shutil.copytree(tiny_weights, weights)
        (weights / f"{layout}.safetensors").unlink()
    assert cli.main(["serve", "--weights", str(weights), "--http-port", str(free_port())]) == 2
    error = capsys.readouterr().err
    assert f"weights {weights}" in error and message in error
    assert "tritonserver" not in error  # refused before starting it


def _serve(tiny_weights, *triton_flags):
    """`minigpt5 serve` on the tiny weights, as a process; returns it ready, with its HTTP and gRPC ports."""
    http_port, grpc_port = free_port(), free_port()
    serve = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "minigpt5.cli",
            "serve",
            "--weights",
            str(tiny_weights),
            "--host",
            "127.0.0.1",
            "--http-port",
            str(http_port),
            "--grpc-port",
            str(grpc_port),
            "--metrics-port",
            str(free_port()),
            "--",
            *triton_flags,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 300
    while not _ready(http_port):
        if serve.poll() is not None or time.monotonic() > deadline:
            serve.kill()
            pytest.fail(serve.communicate()[1].decode()[-2000:])
        time.sleep(1)
    return serve, http_port, grpc_port


@pytest.mark.server
def test_serve_stops_on_sigterm_and_a_second_one_kills_at_once(tmp_path, tiny_weights):
    """`minigpt5 serve` drains on SIGTERM (up to the exit timeout + margin); a second SIGTERM while it
    waits kills tritonserver and its stubs at once, and serve still exits cleanly, leaving nothing behind."""
    serve, http_port, _ = _serve(tiny_weights, "--exit-timeout-secs=120")
    try:
        release = threading.Event()
        threading.Thread(target=_hold_connection, args=(http_port, release), daemon=True).start()  # Triton drains it
        time.sleep(1)
        server_pid = int(subprocess.check_output(["pgrep", "-P", str(serve.pid), "tritonserver"]).split()[0])
        serve.send_signal(signal.SIGTERM)
        time.sleep(3)
        assert serve.poll() is None  # draining for up to 120 s + margin
        serve.send_signal(signal.SIGTERM)
        _, err = serve.communicate(timeout=30)
    finally:
        release.set()
        if serve.poll() is None:
            serve.kill()
    assert serve.returncode == 0, err.decode()[-2000:]
    assert b"killing tritonserver now" in err and b"Traceback" not in err
    assert not _alive(server_pid)


# Text until the context is nearly full, then a 200-step image: several seconds of work on the tiny weights,
# with decoder calls all along (Triton alone cut such an answer at SIGTERM: "Server not ready").
LONG_ANSWER = dict(
    max_tokens=900,
    temperature=0.0,
    repetition_penalty=1.0,
    force_image=True,
    force_image_mode="end",
    num_inference_steps=200,
)


@pytest.mark.server
def test_sigterm_lets_the_answers_in_flight_finish_and_refuses_new_ones(tiny_weights):
    from minigpt5_client import Client
    from minigpt5_client.errors import Overloaded

    serve, _, grpc_port = _serve(tiny_weights, "--exit-timeout-secs=120")
    url = f"127.0.0.1:{grpc_port}"
    try:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            started = threading.Event()

            def long_answer():
                events = []
                for event in Client(url).stream("A very long story.", **LONG_ANSWER):
                    events.append(type(event).__name__)
                    started.set()
                return events

            answer = pool.submit(long_answer)
            assert started.wait(120)
            serve.send_signal(signal.SIGTERM)
            time.sleep(1)
            with pytest.raises(Overloaded, match="shutting down"):
                Client(url).generate("Hello.", max_tokens=4)
            events = answer.result(timeout=200)
        _, err = serve.communicate(timeout=200)
    finally:
        if serve.poll() is None:
            serve.kill()
    assert events[-1] == "Final" and "ImageEvent" in events, events
    assert serve.returncode == 0 and b"draining: 1 request(s) in flight" in err, err.decode()[-2000:]


def _ready(http_port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/v2/health/ready", timeout=2) as reply:
            return reply.status == 200
    except OSError:
        return False


def _hold_connection(http_port: int, release: threading.Event) -> None:
    """An open keep-alive HTTP connection: Triton waits for it to close before it exits."""
    connection = http.client.HTTPConnection("127.0.0.1", http_port, timeout=200)
    connection.request("GET", "/v2/health/live")
    connection.getresponse().read()
    release.wait(180)
    connection.close()


def _alive(pid: int) -> bool:
    try:
        state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")
