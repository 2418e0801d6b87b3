"""Answers as upstream's code produces them (eric-ai-lab/MiniGPT-5): force_image both ways, max_tokens
counting sampled ids only, several voken blocks per answer, CFG off at guidance_scale <= 1, ln_vision's
eps, and the defaults table of docs/API.md against what the server uses."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from minigpt5.config import DEFAULT_GENERATION, LN_VISION_EPS, NUM_VOKENS
from minigpt5.image_decoder import ImageJob
from minigpt5.placement import resolve_dtype
from minigpt5.request import LIMITS, InvalidRequest, build_request
from minigpt5.sampling import SamplingParams
from minigpt5.weights.layout import WeightsDir

API_MD = Path(__file__).resolve().parents[2] / "docs" / "API.md"


def _blocks(result, voken_ids) -> list[int]:
    """Start index of each voken block in the answer's ids; each must be a whole [IMG0]..[IMG7]."""
    ids = result.token_ids
    starts = [i for i, t in enumerate(ids) if t == voken_ids[0]]
    for start in starts:
        assert ids[start : start + NUM_VOKENS] == voken_ids
    assert sum(t in voken_ids for t in ids) == NUM_VOKENS * len(starts)
    return starts


def test_force_image_first_is_upstreams_default_img0_is_the_first_sampled_id(reference_pipeline):
    pipe = reference_pipeline
    assert pipe.request("x", force_image=True).sampling.force_image_mode == "first"
    result = pipe.run(
        "Tell me a story about a dog.", force_image=True, random_seed=3, max_tokens=20, num_inference_steps=3
    )
    assert _blocks(result, pipe.weights.tokens["vokens"]) == [0]
    assert isinstance(result.segments[0], np.ndarray)  # the image comes before any text
    assert result.text and isinstance(result.segments[1], str)


def test_force_image_end_puts_the_image_where_the_answer_would_end(reference_pipeline):
    pipe = reference_pipeline
    result = pipe.run(
        "Tell me a story about a dog.",
        force_image=True,
        force_image_mode="end",
        random_seed=3,
        max_tokens=20,
        num_inference_steps=3,
    )
    starts = _blocks(result, pipe.weights.tokens["vokens"])
    assert len(starts) == 1 and starts[0] > 0 and result.text
    if result.finish_reason == "length":  # forced in the last sampled slot
        assert starts[0] == len(result.token_ids) - NUM_VOKENS == 19
        assert isinstance(result.segments[-1], np.ndarray)


def test_max_tokens_counts_sampled_ids_not_the_forced_vokens(reference_pipeline):
    pipe = reference_pipeline
    vokens = pipe.weights.tokens["vokens"]
    one = pipe.run("Draw a cat.", force_image=True, random_seed=1, max_tokens=1, num_inference_steps=2)
    assert one.token_ids == vokens and one.finish_reason == "length" and len(one.images) == 1
    assert (one.usage.sampled_tokens, one.usage.completion_tokens, one.usage.vokens) == (1, 8, 8)
    text = pipe.run("Draw a cat.", random_seed=1, max_tokens=9, temperature=0.0)
    assert text.usage.sampled_tokens == text.usage.completion_tokens == len(text.token_ids) <= 9


def test_max_images_gives_several_blocks_each_its_own_image_in_order(reference_pipeline):
    pipe = reference_pipeline
    result = pipe.run(
        "Tell me a story in two pictures.",
        force_image=True,
        max_images=2,
        random_seed=5,
        max_tokens=16,
        num_inference_steps=3,
    )
    starts = _blocks(result, pipe.weights.tokens["vokens"])
    assert len(starts) == len(result.images) == 2 and starts[0] == 0  # first: at once; the second at the end
    assert result.usage.images == 2 and result.usage.vokens == 16
    assert result.usage.sampled_tokens == 16 and result.usage.completion_tokens == 16 + 2 * (NUM_VOKENS - 1)
    assert not np.array_equal(result.voken_states[0], result.voken_states[1])
    kinds = [type(s).__name__ for s in result.segments]
    assert kinds == ["ndarray", "str", "ndarray"]
    assert not np.array_equal(result.images[0], result.images[1])


def test_without_force_max_images_zero_bans_img0(reference_pipeline):
    request = reference_pipeline.request("hi", max_images=0)
    assert request.sampling.max_images == 0
    with pytest.raises(InvalidRequest, match=r"max_images: must be >= 1 with force_image"):
        reference_pipeline.request("hi", max_images=0, force_image=True)


@pytest.mark.parametrize(
    "params,message",
    [
        ({"max_images": LIMITS.max_output_images + 1}, f"max_images: must be in [0, {LIMITS.max_output_images}]"),
        ({"force_image_mode": "middle"}, "force_image_mode: must be one of ['first', 'end']"),
        ({"force_image": True, "max_images": 3, "max_tokens": 2}, "max_tokens: must be >= max_images (3)"),
    ],
)
def test_bad_image_count_and_mode_name_the_field_and_limit(reference_pipeline, params, message):
    with pytest.raises(InvalidRequest) as info:
        reference_pipeline.request("hi", **params)
    assert message in str(info.value)


def test_context_check_reserves_seven_positions_per_image(reference_pipeline):
    pipe = reference_pipeline
    prompt_len = len(pipe.prompts.prompt_ids(pipe.request("hello")))
    room = pipe.prompts.max_positions - prompt_len - (NUM_VOKENS - 1) * 8
    pipe.prompts.prompt_ids(pipe.request("hello", max_tokens=room, max_images=8))
    with pytest.raises(InvalidRequest, match="the context is 1024"):
        pipe.prompts.prompt_ids(pipe.request("hello", max_tokens=room + 1, max_images=8))
    pipe.prompts.prompt_ids(pipe.request("hello", max_tokens=room + 1, max_images=7))


@pytest.mark.parametrize("scale,unet_batch", [(1.0, 1), (0.5, 1), (7.5, 2)])
def test_cfg_runs_only_above_guidance_one_as_diffusers(reference_pipeline, scale, unet_batch):
    decoder = reference_pipeline.images.decoder
    batches = []
    hook = decoder.unet.register_forward_pre_hook(lambda module, args: batches.append(args[0].shape[0]))
    try:
        states = torch.randn(NUM_VOKENS, decoder.mapper.fc[0].in_features, generator=torch.Generator().manual_seed(0))
        image = decoder.decode([ImageJob(states, seed=3, guidance_scale=scale, num_inference_steps=2)])
    finally:
        hook.remove()
    assert batches and set(batches) == {unet_batch} and image.shape[0] == 1  # PNDM: 2 steps, 3 UNet calls


def test_unguided_jobs_batch_apart_from_guided_ones(reference_pipeline):
    hidden = reference_pipeline.images.decoder.mapper.fc[0].in_features
    jobs = [
        ImageJob(torch.zeros(NUM_VOKENS, hidden), seed=1, guidance_scale=s, num_inference_steps=1)
        for s in (1.0, 7.5, 2.0)
    ]
    assert jobs[0].batch_key != jobs[1].batch_key == jobs[2].batch_key
    images = reference_pipeline.images.decode(jobs)
    alone = reference_pipeline.images.decode([jobs[0]])
    np.testing.assert_array_equal(images[0], alone[0])


def test_ln_vision_uses_torch_layernorm_eps_and_the_vit_its_own(reference_pipeline):
    vision = reference_pipeline.vision.tower.vision_model
    assert vision.post_layernorm.eps == LN_VISION_EPS == 1e-5
    assert {layer.layer_norm1.eps for layer in vision.encoder.layers} == {1e-6}


def test_vision_tower_runs_in_fp16_on_a_gpu_by_default():
    assert resolve_dtype(None, "cuda:0", gpu_default="fp16") == torch.float16
    assert resolve_dtype("bf16", "cuda:0", gpu_default="fp16") == torch.bfloat16
    assert resolve_dtype(None, "cpu", gpu_default="fp16") == torch.float32


# ---- docs/API.md's defaults are the server's -----------------------------------------------------------


def _api_defaults() -> dict:
    """`input` → default cell of docs/API.md's Inputs table, for the inputs that have one."""
    section = API_MD.read_text().split("## Inputs", 1)[1].split("\n## ", 1)[0]
    header = next(line for line in section.splitlines() if line.startswith("| input"))
    columns = [c.strip() for c in header.strip("|").split("|")]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if line.startswith("| `") and len(cells) == len(columns):
            rows[cells[0].strip("`")] = dict(zip(columns, cells))
    return rows


def _cell_value(cell: str):
    cell = cell.strip("`")
    if cell in ("true", "false"):
        return cell == "true"
    if re.fullmatch(r"-?\d+", cell):
        return int(cell)
    if re.fullmatch(r"-?\d+\.\d+", cell):
        return float(cell)
    return cell


def test_api_md_defaults_table_equals_what_the_server_uses(tiny_weights):
    rows = _api_defaults()
    documented = {name: _cell_value(row["default"]) for name, row in rows.items() if name in DEFAULT_GENERATION}
    assert set(documented) == set(DEFAULT_GENERATION), "every generation default is in docs/API.md"
    weights = WeightsDir(tiny_weights)  # the server's model reads its defaults from here
    assert documented == weights.defaults == DEFAULT_GENERATION
    for name in documented:
        assert re.search(r"\.py:\d+|config|default", rows[name]["source"]), f"{name}: no source given"
    # and a request that sets nothing gets exactly them (the server's build_request)
    request = build_request("hi", defaults=weights.defaults)
    sampling = request.sampling
    used = {
        "max_tokens": sampling.max_tokens,
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
        "top_k": sampling.top_k,
        "repetition_penalty": sampling.repetition_penalty,
        "force_image": sampling.force_image,
        "force_image_mode": sampling.force_image_mode,
        "max_images": sampling.max_images,
        "guidance_scale": request.guidance_scale,
        "num_inference_steps": request.num_inference_steps,
        "scheduler": request.scheduler,
    }
    assert used == documented
    plain = SamplingParams()  # the engine's own defaults agree as well
    assert {k: getattr(plain, k) for k in used if hasattr(plain, k)} == {
        k: documented[k] for k in used if hasattr(plain, k)
    }
