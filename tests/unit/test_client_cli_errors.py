"""`minigpt5 generate|chat` failures that need no server: each is one line on stderr and its exit code."""

from __future__ import annotations

import socket
import struct
import zlib

import numpy as np
import pytest

from minigpt5_client.cli import main
from minigpt5_client.preprocess import MAX_IMAGE_FILE_BYTES, encode_png
from support.client_cli import run_cli


@pytest.fixture(scope="module")
def closed_port() -> int:
    """A local port nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def assert_one_line_error(stderr: str, *phrases: str) -> None:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    for phrase in phrases:
        assert phrase in lines[0], stderr


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_unreachable_server_exits_3(protocol, closed_port, tmp_path):
    result = run_cli(
        "generate",
        "--url",
        f"127.0.0.1:{closed_port}",
        "--protocol",
        protocol,
        "--prompt",
        "hi",
        "--out",
        str(tmp_path),
    )
    assert result.returncode == 3
    assert_one_line_error(result.stderr, "cannot reach the server", f"127.0.0.1:{closed_port}")
    assert result.stdout == "" and not list(tmp_path.iterdir())


def test_unknown_host_exits_3(capsys):
    assert main(["generate", "--url", "no-such-host.invalid:8001", "--prompt", "hi"]) == 3
    assert_one_line_error(capsys.readouterr().err, "cannot reach the server")


def test_bad_image_file_exits_2(tmp_path, capsys, closed_port):
    bad = tmp_path / "notes.png"
    bad.write_text("not a picture")
    assert main(["generate", "--url", f"127.0.0.1:{closed_port}", "--prompt", "hi", "--image", str(bad)]) == 2
    assert_one_line_error(capsys.readouterr().err, str(bad), "not a readable image")


def test_missing_image_file_exits_2(tmp_path, capsys, closed_port):
    assert (
        main(["generate", "--url", f"127.0.0.1:{closed_port}", "--prompt", "hi", "--image", str(tmp_path / "nope.jpg")])
        == 2
    )
    assert_one_line_error(capsys.readouterr().err, "image file not found")


def test_oversize_image_file_exits_2(tmp_path, closed_port):
    big = tmp_path / "big.png"
    big.write_bytes(encode_png(np.zeros((8, 8, 3), np.uint8)) + bytes(MAX_IMAGE_FILE_BYTES))
    result = run_cli("generate", "--url", f"127.0.0.1:{closed_port}", "--prompt", "hi", "--image", str(big))
    assert result.returncode == 2
    assert_one_line_error(result.stderr, "over the 20 MiB limit")


def test_oversize_image_pixels_exits_2(tmp_path, capsys, closed_port):
    # A small file whose header declares 8000 x 8000 pixels: refused before any decoding.
    data = encode_png(np.zeros((1, 1, 3), np.uint8))
    chunk = b"IHDR" + struct.pack(">II", 8000, 8000) + data[24:29]
    huge = tmp_path / "huge.png"
    huge.write_bytes(data[:12] + chunk + struct.pack(">I", zlib.crc32(chunk)) + data[33:])
    assert main(["generate", "--url", f"127.0.0.1:{closed_port}", "--prompt", "hi", "--image", str(huge)]) == 2
    assert_one_line_error(capsys.readouterr().err, "8000x8000", "64.0 megapixels", "over the 40 megapixel limit")


def test_bad_url_exits_2(capsys):
    assert main(["generate", "--url", "localhost:grpc", "--prompt", "hi"]) == 2
    assert_one_line_error(capsys.readouterr().err, "HOST:PORT")


def test_piped_chat_stops_at_the_first_error(closed_port):
    result = run_cli("chat", "--url", f"127.0.0.1:{closed_port}", stdin="hello\nsecond message\n")
    assert result.returncode == 3
    assert_one_line_error(result.stderr, "cannot reach the server")


def test_chat_commands_need_no_server(tmp_path, closed_port):
    result = run_cli(
        "chat",
        "--url",
        f"127.0.0.1:{closed_port}",
        "--format",
        "html",
        stdin=f"\n/help\n/save {tmp_path}\n/quit\nnever sent\n",
    )
    assert result.returncode == 0, result.stderr
    assert "not a command: /help" in result.stderr
    assert (tmp_path / "document.html").exists()
