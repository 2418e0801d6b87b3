"""The client installs and works in a fresh virtual environment holding only the base dependencies (no torch).

Installs the project the way a user of the client does (`pip install <project>`: base dependencies only)
into a new venv without system site-packages; last, the `gateway` extra on top (still no torch).
Takes about a minute and a half (pip).
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def run(*command, check=True) -> subprocess.CompletedProcess:
    result = subprocess.run([str(part) for part in command], capture_output=True, text=True, timeout=600)
    if check and result.returncode != 0:
        pytest.fail(f"{' '.join(map(str, command))} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


@pytest.fixture(scope="module")
def client_venv(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("fresh")
    # A copy of the project, so that building it leaves nothing in the working tree.
    project = work / "project"
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "build", ".venv")
    project.mkdir()
    for name in ("pyproject.toml", "README.md"):  # pyproject.toml names README.md as the long description
        shutil.copy(ROOT / name, project)
    for package in ("client/minigpt5_client", "minigpt5", "bench/minigpt5_bench"):
        shutil.copytree(ROOT / package, project / package, ignore=ignore)
    venv = work / "venv"
    run(sys.executable, "-m", "venv", venv)  # no --system-site-packages: nothing leaks in
    run(venv / "bin" / "python", "-m", "pip", "install", "--quiet", project)
    return venv


@pytest.fixture(scope="module")
def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_only_base_dependencies_are_installed(client_venv):
    assert run(client_venv / "bin" / "python", "-c", "import torch", check=False).returncode != 0
    installed = run(client_venv / "bin" / "python", "-m", "pip", "list", "--format=freeze").stdout.lower()
    for heavy in ("torch", "transformers", "diffusers"):
        assert f"\n{heavy}==" not in f"\n{installed}"


def test_client_imports_without_torch(client_venv):
    code = (
        "import sys, minigpt5_client, minigpt5_client.transport_grpc, minigpt5_client.transport_http, aiohttp; "
        "assert not {'torch', 'transformers', 'diffusers'} & set(sys.modules)"
    )
    run(client_venv / "bin" / "python", "-c", code)


def test_cli_help_and_unreachable_server(client_venv, closed_port):
    python = client_venv / "bin" / "python"
    assert "--force-image" in run(python, "-m", "minigpt5_client", "generate", "--help").stdout
    for protocol in ("grpc", "http"):
        result = run(
            python,
            "-m",
            "minigpt5_client",
            "generate",
            "--url",
            f"127.0.0.1:{closed_port}",
            "--protocol",
            protocol,
            "--prompt",
            "hi",
            check=False,
        )
        assert result.returncode == 3, result.stderr
        assert result.stderr.startswith("error: cannot reach the server")


def test_minigpt5_command_runs_the_client_without_torch(client_venv, closed_port):
    result = run(
        client_venv / "bin" / "minigpt5", "generate", "--url", f"127.0.0.1:{closed_port}", "--prompt", "hi", check=False
    )
    assert result.returncode == 3, result.stderr


def test_the_gateway_extra_installs_and_serves_without_torch(client_venv, closed_port):
    """Last (it adds to the venv): `pip install <project>[gateway]`, then `minigpt5 gateway` answers,
    and a server that is not there is a 503 in OpenAI's error shape."""
    python = client_venv / "bin" / "python"
    run(python, "-m", "pip", "install", "--quiet", f"{client_venv.parent / 'project'}[gateway]")
    assert run(python, "-c", "import torch", check=False).returncode != 0
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    gateway = subprocess.Popen(
        [
            client_venv / "bin" / "minigpt5",
            "gateway",
            "--url",
            f"127.0.0.1:{closed_port}",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        body = json.dumps({"model": "minigpt5", "messages": [{"role": "user", "content": "hi"}]}).encode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/chat/completions", data=body, headers={"Content-Type": "application/json"}
        )
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(request, timeout=30)
                pytest.fail("a chat completion without a server succeeded")
            except urllib.error.HTTPError as error:
                assert error.code == 503 and error.headers["Retry-After"] == "1"
                assert json.loads(error.read())["error"]["code"] == "backend_unreachable"
                break
            except urllib.error.URLError:  # not listening yet
                assert gateway.poll() is None and time.monotonic() < deadline, "the gateway did not start"
                time.sleep(0.3)
    finally:
        gateway.terminate()
        output = gateway.communicate(timeout=30)[0]
    assert "no API keys are configured" in output  # said loudly at start
