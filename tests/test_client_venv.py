"""The client installs and works in a fresh virtual environment holding only the base dependencies (no torch).

Installs the project the way a user of the client does (`pip install <project>`: base dependencies only)
into a new venv without system site-packages. Takes about a minute (pip).
"""
from __future__ import annotations

import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


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
    for package in ("client/minigpt5_client", "minigpt5"):
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
    code = ("import sys, minigpt5_client, minigpt5_client.transport_grpc, minigpt5_client.transport_http, aiohttp; "
            "assert not {'torch', 'transformers', 'diffusers'} & set(sys.modules)")
    run(client_venv / "bin" / "python", "-c", code)


def test_cli_help_and_unreachable_server(client_venv, closed_port):
    python = client_venv / "bin" / "python"
    assert "--force-image" in run(python, "-m", "minigpt5_client", "generate", "--help").stdout
    for protocol in ("grpc", "http"):
        result = run(python, "-m", "minigpt5_client", "generate", "--url", f"127.0.0.1:{closed_port}",
                     "--protocol", protocol, "--prompt", "hi", check=False)
        assert result.returncode == 3, result.stderr
        assert result.stderr.startswith("error: cannot reach the server")


def test_minigpt5_command_runs_the_client_without_torch(client_venv, closed_port):
    result = run(client_venv / "bin" / "minigpt5", "generate", "--url", f"127.0.0.1:{closed_port}",
                 "--prompt", "hi", check=False)
    assert result.returncode == 3, result.stderr
