"""The GPU fast paths switched on through config.pbtxt parameters on a real tritonserver (CPU here):
`decode_cuda_graphs: true` (on the CPU: the graphs' static shapes, run eagerly) and
`llm_quantization: fp8`. The served answer must still be a whole answer; the start log names both."""

from __future__ import annotations

import concurrent.futures

import pytest

from support.servers import start_server
from support.serving_helpers import assemble, grpc_stream, http_generate

pytestmark = pytest.mark.server

STORY = {"text_input": "Tell me a story about a red kite.", "force_image": True, "max_tokens": 24, "random_seed": 7}


@pytest.fixture(scope="module")
def fast_path_server(tiny_weights, tmp_path_factory):
    server = start_server(
        tiny_weights,
        tmp_path_factory.mktemp("triton-fast-paths"),
        parameters={"vicuna_decoder": {"decode_cuda_graphs": "true", "llm_quantization": "fp8", "max_batch_rows": "4"}},
    )
    yield server
    server.process.stop()


def test_the_start_log_names_the_decode_mode_and_the_quantization(fast_path_server):
    log = fast_path_server.log_path.read_text(errors="replace")
    assert "decode: static shapes, eager; LLM quantization: fp8" in log


def test_static_decode_with_fp8_weights_serves_whole_answers(fast_path_server):
    result = assemble(grpc_stream(fast_path_server.grpc_url, STORY))
    assert result["text"] and len(result["images"]) == 1
    assert result["usage"]["images"] == 1 and 1 < result["usage"]["sampled_tokens"] <= STORY["max_tokens"]
    # five requests at once against 4 rows: the static step pads odd batches and the fifth waits its turn
    with concurrent.futures.ThreadPoolExecutor(5) as pool:
        answers = list(
            pool.map(
                lambda seed: http_generate(
                    fast_path_server.http_url, {**STORY, "random_seed": seed, "force_image": False}
                ),
                range(5),
            )
        )
    assert all(answer["text_output"] for answer in answers)
