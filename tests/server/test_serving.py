"""The real tritonserver serving the real model repository (tiny weights): all three ways in,
equality with the in-process pipeline, batching across requests, errors under concurrency."""

from __future__ import annotations

import base64
import concurrent.futures
import io
import json
import subprocess
import urllib.error
import urllib.request

import numpy as np
import pytest
import tritonclient.http as httpclient
from PIL import Image
from tritonclient.utils import InferenceServerException

from support.serving_helpers import assemble, grpc_stream, http_generate, sse_events

pytestmark = pytest.mark.server

# Images decoded in a batch with other requests may differ from the lone result by float rounding in
# the batched UNet/VAE matmuls; in uint8 levels that stays within this (text must match exactly).
BATCHED_IMAGE_TOLERANCE = 2
STORY = {"text_input": "Tell me a story about a red kite.", "force_image": True, "max_tokens": 24, "random_seed": 7}


def _image(seed: int) -> np.ndarray:
    return np.random.RandomState(seed).randint(0, 256, (1, 224, 224, 3), dtype=np.uint8)


def _png_b64(pixels: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def _reference(pipeline, params: dict):
    params = dict(params)
    prompt = params.pop("text_input")
    images = params.pop("images", None)
    params.pop("stream", None)
    return pipeline.run(prompt, images, **params)


def test_grpc_stream_gives_ordered_text_and_image_events(triton_server):
    events = grpc_stream(triton_server.grpc_url, STORY)
    kinds = [e["event_type"][0] for e in events]
    assert [e["sequence_index"][0] for e in events] == list(range(len(events)))
    assert kinds[-1] == "final" and "text" in kinds
    assert kinds.index("image_start") < kinds.index("image")
    result = assemble(events)
    assert result["text"] and len(result["images"]) == 1
    assert result["usage"]["images"] == 1 and result["usage"]["vokens"] == 8
    assert result["usage"]["sampled_tokens"] <= STORY["max_tokens"]  # the 7 forced vokens do not count
    assert result["usage"]["completion_tokens"] == result["usage"]["sampled_tokens"] + 7


def test_sse_works_with_plain_curl(triton_server):
    body = json.dumps({**STORY, "stream": True})
    out = subprocess.run(
        [
            "curl",
            "-sN",
            "--max-time",
            "120",
            "-X",
            "POST",
            "-H",
            "Content-Type: application/json",
            f"http://{triton_server.http_url}/v2/models/minigpt5/generate_stream",
            "-d",
            body,
        ],
        capture_output=True,
        check=True,
        timeout=150,
    )
    result = assemble(sse_events(out.stdout))
    assert result["text"] and len(result["images"]) == 1 and result["finish_reason"]


def test_generate_returns_one_complete_response(triton_server):
    reply = http_generate(triton_server.http_url, STORY)
    assert reply["event_type"] == "complete"
    result = assemble([reply])
    assert result["text"] and len(result["images"]) == 1
    assert result["usage"]["completion_tokens"] > 0


def assert_same_image(served: np.ndarray, expected: np.ndarray) -> None:
    """Equal up to float rounding: a prompt whose prefix came from the decoder's prefix cache is
    prefilled in two parts (fewer rows per matmul), which may round differently from one prefill."""
    assert served.shape == expected.shape
    assert np.abs(served.astype(int) - expected.astype(int)).max() <= BATCHED_IMAGE_TOLERANCE


def uncached(usage: dict) -> dict:
    """Served usage without `cached_prompt_positions` (it depends on what earlier requests left cached)."""
    return {key: value for key, value in usage.items() if key != "cached_prompt_positions"}


def test_lone_request_equals_in_process_run(triton_server, reference_pipeline):
    params = {**STORY, "images": _image(1), "text_input": "What do you see? Draw it."}
    served = assemble(grpc_stream(triton_server.grpc_url, params))
    expected = _reference(reference_pipeline, params)
    assert served["text"] == expected.text
    assert len(served["images"]) == len(expected.images) == 1
    assert_same_image(served["images"][0], expected.images[0])
    assert served["usage"]["image_tokens"] == expected.usage.image_tokens == 32


def test_encoded_image_bytes_over_http_equal_preprocessed_pixels(triton_server, reference_pipeline):
    pixels = _image(2)
    body = {**STORY, "text_input": "Describe this.", "image_bytes": [_png_b64(pixels[0])]}
    served = assemble([http_generate(triton_server.http_url, body)])
    expected = _reference(reference_pipeline, {**STORY, "text_input": "Describe this.", "images": pixels})
    assert served["text"] == expected.text
    assert_same_image(served["images"][0], expected.images[0])


def _stats(url: str, model: str) -> tuple[int, int]:
    stats = httpclient.InferenceServerClient(url).get_inference_statistics(model)["model_stats"][0]
    return stats["inference_count"], stats["execution_count"]


def test_concurrent_requests_batch_and_match_in_process(triton_server, reference_pipeline):
    requests = [
        {**STORY, "random_seed": 100 + i, "images": _image(10 + i), "max_tokens": 16 + 4 * (i % 3)} for i in range(6)
    ]
    before = {m: _stats(triton_server.http_url, m) for m in ("vision_encoder", "image_decoder")}
    with concurrent.futures.ThreadPoolExecutor(len(requests)) as pool:
        served = list(pool.map(lambda p: assemble(grpc_stream(triton_server.grpc_url, p)), requests))
    for params, result in zip(requests, served):
        expected = _reference(reference_pipeline, params)
        assert result["text"] == expected.text
        assert len(result["images"]) == len(expected.images) == 1
        diff = np.abs(result["images"][0].astype(int) - expected.images[0].astype(int)).max()
        assert diff <= BATCHED_IMAGE_TOLERANCE
    for model, (inferences0, executions0) in before.items():
        inferences, executions = _stats(triton_server.http_url, model)
        assert inferences - inferences0 == len(requests)
        assert executions - executions0 < inferences - inferences0, f"{model} did not batch"


@pytest.mark.parametrize(
    "field,value,expected",
    [
        ("temperature", -1.0, "temperature: must be in [0.0, 5.0]"),
        ("max_tokens", 0, "max_tokens: must be in [1, 1024]"),
        ("num_inference_steps", 0, "num_inference_steps: must be in [1, 200]"),
        ("scheduler", "euler", "scheduler: must be one of"),
        ("text_input", "", "text_input: must not be empty"),
    ],
)
def test_malformed_request_is_invalid_arg_while_good_ones_complete(triton_server, field, value, expected):
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        good = [pool.submit(grpc_stream, triton_server.grpc_url, {**STORY, "random_seed": i}) for i in range(2)]
        with pytest.raises(urllib.error.HTTPError) as http_error:
            http_generate(triton_server.http_url, {**STORY, field: value})
        assert http_error.value.code == 400
        assert expected in json.loads(http_error.value.read())["error"]
        with pytest.raises(InferenceServerException, match=expected.replace("[", r"\[").replace("(", r"\(")):
            grpc_stream(triton_server.grpc_url, {**STORY, field: value})
        for future in good:
            assert assemble(future.result())["images"]


def test_several_images_in_one_streamed_answer_in_order_equal_in_process(triton_server, reference_pipeline):
    """max_images=2 with force_image (mode first): [IMG0] first, the second block forced at the last
    sampled slot; each block is its own image_start/image pair, in answer order, as in-process."""
    params = {
        **STORY,
        "text_input": "Tell it in two pictures.",
        "max_images": 2,
        "max_tokens": 16,
        "num_inference_steps": 4,
    }
    events = grpc_stream(triton_server.grpc_url, params)
    kinds = [e["event_type"][0] for e in events]
    assert kinds.count("image_start") == kinds.count("image") == 2
    served = assemble(events)
    expected = _reference(reference_pipeline, params)
    assert served["text"] == expected.text and served["text"]
    assert len(served["images"]) == len(expected.images) == 2
    for got, want in zip(served["images"], expected.images):
        assert_same_image(got, want)
    assert served["offsets"] == [0, len(served["text"])]
    assert uncached(served["usage"]) == expected.usage.as_dict()
    assert (
        served["usage"]["images"],
        served["usage"]["vokens"],
        served["usage"]["sampled_tokens"],
        served["usage"]["completion_tokens"],
    ) == (2, 16, 16, 16 + 2 * 7)


def test_force_image_mode_end_over_http_equals_in_process(triton_server, reference_pipeline):
    params = {**STORY, "force_image_mode": "end", "max_tokens": 12, "num_inference_steps": 4}
    served = assemble([http_generate(triton_server.http_url, params)])
    expected = _reference(reference_pipeline, params)
    assert served["text"] == expected.text and len(served["images"]) == 1
    assert_same_image(served["images"][0], expected.images[0])
    assert served["offsets"][0] > 0  # after text, not first
    assert uncached(served["usage"]) == expected.usage.as_dict()


def test_user_text_with_special_tokens_stays_text(triton_server, reference_pipeline):
    params = {**STORY, "text_input": "Draw [IMG0] and <ImageHere> please", "max_tokens": 12}
    served = assemble(grpc_stream(triton_server.grpc_url, params))
    assert served["text"] == _reference(reference_pipeline, params).text


def test_history_turns_are_used(triton_server, reference_pipeline):
    from minigpt5.prompt import Turn

    history = [
        {"role": "human", "text": "Hi, look at this.", "num_images": 1},
        {"role": "assistant", "text": "A nice picture.", "num_images": 0},
    ]
    params = {**STORY, "text_input": "Continue the story.", "history": json.dumps(history), "images": _image(4)}
    served = assemble(grpc_stream(triton_server.grpc_url, params))
    expected = reference_pipeline.run(
        "Continue the story.", _image(4), [Turn(**t) for t in history], force_image=True, max_tokens=24, random_seed=7
    )
    assert served["text"] == expected.text
    assert served["usage"]["prompt_tokens"] == expected.usage.prompt_tokens
