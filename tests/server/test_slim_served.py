"""The `slim` preset (the real widths: LLM 4096, ViT 1408, Q-Former 768, mapper 1024, SD 2.1-base UNet
and VAE, with the fewest layers) through the real tritonserver on the CPU: real-width tensors cross
between the stubs and a real 512x512 PNG comes out, equal to the in-process pipeline for a fixed seed.

CPU-friendly settings, as for the full-preset rehearsal (docs/BENCHMARKS.md): bf16 everywhere,
DPM-Solver++ with 2 steps, a few tokens, no classifier-free guidance (the guided path is the tiny
preset's, tests/server/test_serving.py)."""

from __future__ import annotations

import gc

import numpy as np
import pytest
from safetensors import safe_open

from minigpt5.pipeline import MiniGPT5Pipeline
from minigpt5.weights.layout import WeightsDir, component_file
from minigpt5.weights.random_weights import build_random_weights
from support.servers import start_server
from support.serving_helpers import assemble, grpc_stream

pytestmark = pytest.mark.server

BF16 = {model: {"dtype": "bf16"} for model in ("vision_encoder", "vicuna_decoder", "image_decoder")}
REQUEST = {
    "text_input": "t5 t6 t7 t8",
    "force_image": True,
    "max_tokens": 4,
    "random_seed": 3,
    "num_inference_steps": 2,
    "scheduler": "dpm",
    "guidance_scale": 1.0,
}
# module: (a tensor, its real shape): LLaMA-7B's embedding (32000 ids + 9 MiniGPT-5 tokens), EVA ViT-g,
# the Q-Former, the mapper into SD's 1024-wide text space, SD 2.1-base's deepest UNet block, its VAE.
REAL_SHAPES = {
    "llm": ("model.embed_tokens.weight", (32009, 4096)),
    "vision": ("vision_model.encoder.layers.0.mlp.fc1.weight", (6144, 1408)),
    "mapper": ("t2i_decoder_prompt", (1, 77, 1024)),
    "unet": ("mid_block.resnets.0.conv1.weight", (1280, 1280, 3, 3)),
    "vae": ("decoder.conv_in.weight", (512, 4, 3, 3)),
}


@pytest.fixture(scope="module")
def slim_weights(tmp_path_factory):
    return build_random_weights(tmp_path_factory.mktemp("slim") / "weights", "slim", "bf16", seed=0)


def test_slim_weights_have_the_real_widths(slim_weights):
    weights = WeightsDir(slim_weights)
    for module, (key, shape) in REAL_SHAPES.items():
        with safe_open(str(slim_weights / component_file(module)), framework="pt") as handle:
            assert tuple(handle.get_slice(key).get_shape()) == shape, (module, key)
    qformer = weights.arch["qformer"]
    assert (qformer["hidden_size"], qformer["num_hidden_layers"]) == (768, 2)  # one layer with cross-attention
    assert weights.arch["llm"]["num_hidden_layers"] == 1


def test_slim_served_end_to_end_equals_in_process(slim_weights, tmp_path):
    image = np.random.RandomState(0).randint(0, 256, (1, 224, 224, 3), dtype=np.uint8)
    params = {k: v for k, v in REQUEST.items() if k != "text_input"}
    pipeline = MiniGPT5Pipeline(slim_weights, device="cpu", dtype="bf16", vision_dtype="bf16", image_dtype="bf16")
    expected = pipeline.run(REQUEST["text_input"], image, **params)
    del pipeline
    gc.collect()  # the server's stubs load the same modules again

    server = start_server(slim_weights, tmp_path, parameters=BF16)
    try:
        served = assemble(grpc_stream(server.grpc_url, {**REQUEST, "images": image}, timeout=600))
    finally:
        server.process.stop()
    assert served["usage"]["image_tokens"] == 32 and served["usage"]["images"] == 1
    assert served["images"][0].shape == (512, 512, 3)  # decoded from the PNG the server sent
    assert served["text"] == expected.text
    np.testing.assert_array_equal(served["images"][0], expected.images[0])
    # the first request of a fresh server: nothing of its prompt can come from the prefix cache
    assert served["usage"].pop("cached_prompt_positions") == 0
    assert served["usage"] == expected.usage.as_dict()
