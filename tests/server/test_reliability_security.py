"""Security: restricted control APIs by default, config.pbtxt parameter overrides (`--param`),
weights never unpickled, no request input that names a file, and Triton 2.51's HTTP body limit."""

from __future__ import annotations

import argparse
import ast
import json
import shutil
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest

from minigpt5.launcher.binary import TritonBinary
from minigpt5.launcher.local import LocalServer, free_port
from minigpt5.launcher.process import ADMIN_HEADER, RESTRICTED_APIS, TritonProcess, security_args
from minigpt5.launcher.repository import (
    REPOSITORY,
    config_parameters,
    parse_parameter_flags,
    prepare_repository,
    rewrite_parameters,
)
from minigpt5_bench.reliability.bodies import FORM, echo_repository, infer_body, post_body
from minigpt5_bench.reliability.security import probe_security

ROOT = Path(__file__).resolve().parents[2]


# ---- the control APIs -------------------------------------------------------------------------------
@pytest.mark.server
def test_control_apis_are_refused_without_the_admin_key_while_inference_works(triton_server):
    result = probe_security(triton_server)
    assert result["refused"] == result["tried"], json.dumps(result, indent=1)
    assert all(r["status"] == "403" for r in result["http"])
    assert all("restricted" in r["message"] for r in result["grpc"])
    assert result["open"]["health_ready"] == "200" and result["open"]["model_metadata"] == "200"
    assert result["open"]["statistics"] == "200" and result["open"]["grpc_server_ready"]
    assert result["inference"]


def test_the_command_restricts_model_control_shared_memory_trace_and_logging(tmp_path):
    process = TritonProcess(tmp_path, workdir=tmp_path, admin_key="s3cret-key")
    cmd = process.command(TritonBinary(Path("/bin/tritonserver")))
    apis = ",".join(RESTRICTED_APIS)
    assert "--model-control-mode=none" in cmd
    assert f"--http-restricted-api={apis}:{ADMIN_HEADER}=s3cret-key" in cmd
    assert f"--grpc-restricted-protocol={apis}:{ADMIN_HEADER}=s3cret-key" in cmd
    assert {"model-repository", "shared-memory"} <= set(RESTRICTED_APIS)


def test_without_a_key_nobody_holds_one(tmp_path, monkeypatch):
    monkeypatch.delenv("MINIGPT5_ADMIN_KEY", raising=False)
    keys = set()
    for _ in range(2):
        flag = next(a for a in security_args(None, []) if a.startswith("--http-restricted-api"))
        keys.add(flag.rsplit("=", 1)[1])
    assert len(keys) == 2 and all(len(k) >= 32 for k in keys)  # random, different every start
    monkeypatch.setenv("MINIGPT5_ADMIN_KEY", "from-env")
    assert TritonProcess(tmp_path).admin_key == "from-env"
    with pytest.raises(ValueError, match="admin key"):
        security_args("bad:key=1", [])


def test_operator_flags_replace_the_default_restriction():
    args = security_args("k", ["--http-restricted-api=model-repository:x=y"])
    assert not any(a.startswith("--http-restricted-api") for a in args)
    assert any(a.startswith("--grpc-restricted-protocol") for a in args)


# ---- parameter overrides ----------------------------------------------------------------------------
def test_parameter_overrides_rewrite_a_copy_of_the_repository(tmp_path):
    repository = prepare_repository(
        tmp_path,
        {"minigpt5": {"max_inflight_requests": "4", "request_timeout_s": "30"}, "image_decoder": {"dtype": "fp32"}},
    )
    assert repository == tmp_path / "model_repository" and repository != REPOSITORY
    original = (REPOSITORY / "minigpt5" / "config.pbtxt").read_text()
    assert config_parameters((repository / "minigpt5" / "config.pbtxt").read_text()) == {
        **config_parameters(original),
        "max_inflight_requests": "4",
        "request_timeout_s": "30",
    }
    assert config_parameters((repository / "image_decoder" / "config.pbtxt").read_text()) == {
        "weights": "",
        "dtype": "fp32",
        "cpu_threads": "0",
    }
    assert config_parameters(original)["max_inflight_requests"] == "64"  # the repository is never edited
    copied, source = (_config(path) for path in (repository / "minigpt5", REPOSITORY / "minigpt5"))
    for config in (copied, source):
        config.ClearField("parameters")
    assert copied == source  # nothing but the parameters differs
    assert (repository / "minigpt5" / "1" / "model.py").is_file()


def test_the_served_copy_holds_only_model_directories(tmp_path):
    """A model directory left by an older checkout (only its __pycache__ survives `git pull`) would
    stop Triton from starting ("could not determine backend"): it is not copied, nor __pycache__."""
    source = tmp_path / "source"
    shutil.copytree(REPOSITORY, source, ignore=shutil.ignore_patterns("__pycache__"))
    (source / "retired_model" / "1" / "__pycache__").mkdir(parents=True)
    (source / "minigpt5" / "1" / "__pycache__").mkdir()
    served = prepare_repository(tmp_path / "work", {}, source)
    assert sorted(p.name for p in served.iterdir()) == sorted(p.parent.name for p in source.glob("*/config.pbtxt"))
    assert not list(served.rglob("__pycache__"))


@pytest.mark.parametrize(
    "parameters,message",
    [
        ({"nope": {"x": "1"}}, "no model nope"),
        ({"minigpt5": {"max_inflight": "1"}}, "no parameter max_inflight"),
    ],
)
def test_unknown_models_and_keys_are_refused(tmp_path, parameters, message):
    with pytest.raises(ValueError, match=message):
        prepare_repository(tmp_path, parameters)
    assert not (tmp_path / "model_repository").exists()  # nothing copied


def test_commented_out_entries_are_not_parameters():
    text = (
        'parameters [\n  # { key: "ghost", value: { string_value: "1" } },\n'
        '  { key: "real", value: { string_value: "2" } }  # { key: "x", value: { string_value: "3" } }\n]\n'
    )
    assert config_parameters(text) == {"real": "2"}
    rewritten = rewrite_parameters(text, {"real": "9"})
    assert config_parameters(rewritten) == {"real": "9"}


@pytest.mark.parametrize("value", ['a" } } parameters [ { key: "x"', "a\nb", "back\\slash"])
def test_any_string_value_is_written_as_that_string(tmp_path, value):
    """Values are written through protobuf: quotes, newlines and backslashes cannot add configuration."""
    repository = prepare_repository(tmp_path, {"minigpt5": {"weights": value}})
    served = config_parameters((repository / "minigpt5" / "config.pbtxt").read_text())
    assert served["weights"] == value and "x" not in served


def _config(model_directory):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    return text_format.Parse((model_directory / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())


def test_serve_param_and_admin_key_flags(capsys):
    from minigpt5 import cli

    assert parse_parameter_flags(
        ["minigpt5.max_inflight_requests=4", "minigpt5.request_timeout_s=9", "image_decoder.dtype=fp32"]
    ) == {"minigpt5": {"max_inflight_requests": "4", "request_timeout_s": "9"}, "image_decoder": {"dtype": "fp32"}}
    for bad in ("max_inflight_requests=4", "minigpt5.max_inflight_requests", ".x=1"):
        with pytest.raises(ValueError, match="MODEL.KEY=VALUE"):
            parse_parameter_flags([bad])
    parser = argparse.ArgumentParser()
    cli._add_serve(parser.add_subparsers())
    args = parser.parse_args(["serve", "--param", "minigpt5.max_inflight_requests=4", "--admin-key", "k"])
    assert args.param == ["minigpt5.max_inflight_requests=4"] and args.admin_key == "k"
    # An unknown key stops `minigpt5 serve` before anything loads.
    assert cli.main(["serve", "--param", "minigpt5.nope=1"]) == 2
    assert "no parameter nope" in capsys.readouterr().err


# ---- weights and request inputs ---------------------------------------------------------------------
def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node, ast.unparse(node.func)


def test_weights_are_read_only_from_safetensors_or_weights_only_pickles():
    for path in [
        *ROOT.glob("minigpt5/**/*.py"),
        *ROOT.glob("client/minigpt5_client/**/*.py"),
        *ROOT.glob("model_repository/*/1/model.py"),
    ]:
        tree = ast.parse(path.read_text())
        for call, name in _calls(tree):
            where = f"{path.relative_to(ROOT)}:{call.lineno}"
            if name == "torch.load":
                keywords = {k.arg: k.value for k in call.keywords}
                only = keywords.get("weights_only")
                assert isinstance(only, ast.Constant) and only.value is True, where
            assert name not in ("pickle.load", "pickle.loads", "dill.load", "joblib.load"), where
            if name.endswith("np.load") or name.endswith("numpy.load"):
                assert not any(k.arg == "allow_pickle" for k in call.keywords), where
            if name.endswith("from_pretrained"):
                assert "AutoTokenizer" in name, f"{where}: only the tokenizer comes from from_pretrained"
    layout = (ROOT / "minigpt5" / "weights" / "layout.py").read_text()
    assert "safetensors" in layout and "torch.load" not in layout


def test_no_request_input_or_parameter_can_name_a_file():
    """The public model's inputs are data (text, pixels, encoded bytes, numbers), and the model never
    reads request parameters (Triton forwards unknown JSON fields and gRPC parameters as such)."""
    config = (ROOT / "model_repository" / "minigpt5" / "config.pbtxt").read_text()
    inputs = config.split("input [", 1)[1].split("]\noutput", 1)[0]
    names = [line.split('"')[1] for line in inputs.splitlines() if 'name: "' in line]
    assert names and not any(w in n for n in names for w in ("path", "file", "url", "dir", "weights", "repository"))
    for path in ROOT.glob("minigpt5/serving/*.py"):
        for call, name in _calls(ast.parse(path.read_text())):
            assert not name.endswith(".parameters"), f"{path.name}:{call.lineno} reads request parameters"


# ---- Triton 2.51's HTTP request body limit (upstream; documented in docs/LIMITS.md) -------------------
@pytest.mark.server
def test_triton_2_51_dies_on_form_encoded_http_bodies_over_4_mib(tiny_weights, tmp_path):
    """A sentinel, not a feature: tritonserver 2.51 (the pytriton build we run) SIGSEGVs on an
    application/x-www-form-urlencoded request body above ~4 MiB (4,184,7xx bytes measured) on the
    /generate and /infer endpoints of a decoupled model, whatever the content: the Content-Type that
    `curl -d` and urllib send by default. JSON and chunked bodies of the same size pass. Hence
    docs/LIMITS.md: clients send Content-Type: application/json, and the proxy in front caps bodies. A
    one-model repository (starts in seconds) shows it; when this test fails, the warning can go."""
    repository = echo_repository(tmp_path)
    server = LocalServer(tiny_weights, repository=repository, name="echo")
    server.start(timeout=120)
    try:
        assert post_body(server.http_url, infer_body(1 << 20), content_type=FORM) == "200"
        assert post_body(server.http_url, infer_body(8 << 20)) == "200"  # application/json
        assert post_body(server.http_url, infer_body(8 << 20), content_type=FORM, chunked=True) == "200"
        assert server.process.process.poll() is None
        status = post_body(server.http_url, infer_body(8 << 20), content_type=FORM)
        deadline = time.monotonic() + 20
        while server.process.process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert status.startswith("connection_error") and server.process.process.poll() is not None, (
            f"tritonserver survived an 8 MiB form body ({status}): the warning in docs/LIMITS.md may go"
        )
    finally:
        server.stop()


# ---- whose server answers ---------------------------------------------------------------------------
class _ReadyImpostor(BaseHTTPRequestHandler):
    """Another server on the port: ready, but not ours."""

    def do_GET(self):  # noqa: N802 - http.server's naming
        body = b"" if self.path.endswith("/ready") else json.dumps({"name": "someone-else"}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.mark.server
def test_another_server_on_the_port_is_not_taken_for_ours(tmp_path, tiny_weights):
    """A free port can be taken between choosing it and Triton binding it (Triton binds only after
    loading its models). wait_ready checks the server id, so it fails instead of returning on the word
    of whatever answers there."""
    impostor = HTTPServer(("127.0.0.1", 0), _ReadyImpostor)
    threading.Thread(target=impostor.serve_forever, daemon=True).start()
    process = TritonProcess(
        tiny_weights,
        http_port=impostor.server_port,
        grpc_port=free_port(),
        metrics_port=free_port(),
        host="127.0.0.1",
        device="cpu",
        repository=echo_repository(tmp_path),
        log_file=tmp_path / "tritonserver.log",
    )
    try:
        process.start()
        with pytest.raises(RuntimeError, match="taken"):
            process.wait_ready(timeout=120)
    finally:
        process.stop()
        impostor.shutdown()
