"""Bad inputs: every input class of docs/LIMITS.md over gRPC streaming, HTTP /generate and
/generate_stream against the shared server (refusals do not break it). The table of cases is
bench/minigpt5_bench/reliability/inputs.py's `input_cases()`, the same one `minigpt5-bench reliability` runs."""

from __future__ import annotations

import json

import pytest

from minigpt5_bench.reliability.inputs import input_cases, probe_inputs

pytestmark = pytest.mark.server

INPUT_CLASSES = {  # every class of bad input the server must refuse with a clear error
    "empty prompt",
    "prompt longer than the context",
    "max_tokens <= 0",
    "max_tokens above the limit",
    "sampling parameter out of range",
    "image parameter out of range",
    "wrong type",
    "more images than the limit",
    "more image placeholders than images",
    "undecodable image bytes",
    "truncated image bytes",
    "decompression bomb",
    "wrong dtype",
    "wrong shape",
    "non-UTF-8 text",
    "special tokens in user text",
    "file path in a request",
}


def test_the_table_covers_every_class_of_bad_input():
    cases = input_cases()
    assert INPUT_CLASSES <= {c.input_class for c in cases}
    assert len({c.name for c in cases}) == len(cases)
    for case in cases:
        assert case.expect in ("invalid", "refused", "accepted")
        assert case.field or case.expect == "accepted", case.name


@pytest.fixture(scope="module")
def matrix(triton_server):
    return probe_inputs(triton_server)


def test_every_bad_input_is_refused_naming_the_field_and_the_server_keeps_serving(matrix, triton_server):
    unexpected = "\n".join(json.dumps(r) for r in matrix["unexpected"])
    assert not matrix["unexpected"], f"answers not as documented:\n{unexpected}\n{triton_server.log_tail()}"
    assert matrix["served_after"], "a good request after the whole table failed"
    rows = matrix["results"]
    # Our own validation: INVALID_ARG (HTTP 400, gRPC INVALID_ARGUMENT) whose message names the field.
    ours = [r for r in rows if r["expect"] == "invalid"]
    assert ours and all(r["field_named"] and r["status"] in ("400", "INVALID_ARGUMENT") for r in ours)
    assert {r["transport"] for r in ours} == {"grpc", "http", "sse"}
    # Wrong dtypes and shapes never reach the model: Triton refuses them naming the input.
    triton = [r for r in rows if r["expect"] == "refused" and r["transport"] == "grpc"]
    assert triton and all(r["field_named"] and not r["ok"] for r in triton)
    # Look-alikes are served: special tokens typed by users stay text; path-like parameters are ignored.
    accepted = [r for r in rows if r["expect"] == "accepted"]
    assert len(accepted) >= 6 and all(r["ok"] for r in accepted)
    print(json.dumps({k: v for k, v in matrix.items() if k not in ("results", "unexpected")}, indent=1))


def test_json_values_of_the_wrong_type_are_refused_by_triton_before_the_model(matrix):
    """Triton 2.51's /generate JSON parser refuses them itself (HTTP 500 'Unable to parse ...') without
    naming the field: documented in docs/LIMITS.md. The server keeps serving (checked above)."""
    rows = [r for r in matrix["results"] if r["case"].startswith("json_") and r["expect"] == "refused"]
    assert rows
    for row in rows:
        assert row["status"] in ("400", "500") and row["message"], row


def test_kserve_infer_and_grpc_model_infer_are_refused_for_the_decoupled_model(matrix):
    endpoints = matrix["infer_endpoints"]
    assert endpoints["http_infer"]["status"] in ("400", "501")
    assert "decoupled" in endpoints["http_infer"]["message"]
    assert endpoints["grpc_model_infer"]["status"] in ("UNIMPLEMENTED", "INVALID_ARGUMENT")
    assert "decoupled" in endpoints["grpc_model_infer"]["message"]
