"""Model core on tiny weights: decoding with vokens, hidden-state capture, CFG constant, prompts, weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from minigpt5.config import NUM_VOKENS
from minigpt5.request import InvalidRequest
from minigpt5.weights.layout import WeightsDir
from minigpt5.weights.tiny import build_tiny_weights

STATE_TOLERANCE = 1e-4  # fp32: incremental (KV-cached) vs one full forward differ by float rounding only


def test_run_force_image_gives_text_and_image(reference_pipeline):
    result = reference_pipeline.run("Tell me a story about a dog.", force_image=True, random_seed=3, max_tokens=40)
    assert result.text
    assert len(result.images) == 1
    size = reference_pipeline.images.decoder.image_size
    assert result.images[0].shape == (size, size, 3) and result.images[0].dtype == np.uint8
    assert result.images[0].std() > 0  # a real decoded image, not a constant
    assert result.usage.images == 1 and result.usage.vokens == NUM_VOKENS
    # max_tokens counts sampled ids; completion_tokens also counts the image's 7 forced vokens
    assert result.usage.completion_tokens == len(result.token_ids) == result.usage.sampled_tokens + NUM_VOKENS - 1
    assert result.usage.sampled_tokens <= 40


def test_voken_states_equal_full_forward(reference_pipeline):
    pipe = reference_pipeline
    images = np.random.RandomState(0).randint(0, 256, (1, 224, 224, 3), dtype=np.uint8)
    request = pipe.request(
        "Describe the picture and draw another.", images, force_image=True, random_seed=11, max_tokens=30
    )
    result = pipe.run("Describe the picture and draw another.", images, force_image=True, random_seed=11, max_tokens=30)
    voken_ids = pipe.weights.tokens["vokens"]
    ids = result.token_ids
    starts = [i for i, t in enumerate(ids) if t == voken_ids[0]]
    assert len(starts) == len(result.images) == 1
    # exactly one contiguous block [IMG0]..[IMG7] per image, and no stray voken anywhere else
    for s in starts:
        assert ids[s : s + NUM_VOKENS] == voken_ids
    assert sum(t in voken_ids for t in ids) == NUM_VOKENS * len(starts)

    # One full forward over prompt + everything generated, then pick the states that predicted IMG0..IMG7.
    prompt_ids = pipe.prompts.prompt_ids(request)
    decode_request = pipe.decoder.make_request("check", prompt_ids, pipe.vision.encode(images), request.sampling)
    llm = pipe.decoder.llm
    with torch.inference_mode():
        generated = llm.get_input_embeddings()(torch.tensor(ids)).float()
        sequence = torch.cat([decode_request.prompt_embeds, generated])[None]
        states = llm.model(inputs_embeds=sequence).last_hidden_state[0]
    prompt_len = decode_request.prompt_embeds.shape[0]
    first = prompt_len + starts[0] - 1  # the position whose output sampled IMG0
    expected = states[first : first + NUM_VOKENS].numpy()
    np.testing.assert_allclose(result.voken_states[0], expected, atol=STATE_TOLERANCE, rtol=0)


def test_same_seed_same_text_and_image(reference_pipeline):
    a = reference_pipeline.run("A day at the sea", force_image=True, random_seed=5, max_tokens=24)
    b = reference_pipeline.run("A day at the sea", force_image=True, random_seed=5, max_tokens=24)
    c = reference_pipeline.run("A day at the sea", force_image=True, random_seed=6, max_tokens=24)
    assert a.text == b.text and a.token_ids == b.token_ids
    np.testing.assert_array_equal(a.images[0], b.images[0])
    assert a.token_ids != c.token_ids


def test_negative_embedding_is_mapper_of_zeros(reference_pipeline):
    decoder = reference_pipeline.images.decoder
    hidden = decoder.mapper.fc[0].in_features
    expected = decoder.mapper(torch.zeros(1, NUM_VOKENS, hidden))
    torch.testing.assert_close(decoder.negative_embeds, expected)
    before = decoder.negative_embeds.clone()
    reference_pipeline.run("draw", force_image=True, random_seed=1, max_tokens=10)
    torch.testing.assert_close(decoder.negative_embeds, before, rtol=0, atol=0)


@pytest.mark.parametrize("text", ["[IMG0] please", "<ImageHere> here", "</s> end [IMG7]"])
def test_user_text_never_becomes_special_tokens(reference_pipeline, text):
    pipe = reference_pipeline
    ids = pipe.prompts.prompt_ids(pipe.request(text))
    tokens = pipe.weights.tokens
    special = set(tokens["vokens"]) | {tokens["image_placeholder"], tokens["eos_id"]}
    assert not special & set(ids[1:])  # BOS is ids[0]
    decoded = pipe.prompts.tokenizer.decode(ids[1:])
    assert text in decoded


def test_images_take_placeholders_in_order(reference_pipeline):
    pipe = reference_pipeline
    images = np.zeros((2, 224, 224, 3), dtype=np.uint8)
    request = pipe.request("compare these", images)
    ids = pipe.prompts.prompt_ids(request)
    assert ids.count(pipe.weights.tokens["image_placeholder"]) == 2
    decode_request = pipe.decoder.make_request("x", ids, pipe.vision.encode(images), request.sampling)
    assert decode_request.image_tokens == 64
    assert decode_request.prompt_embeds.shape[0] == len(ids) - 2 + 64


def test_stop_at_max_tokens_and_no_image_without_force(reference_pipeline):
    result = reference_pipeline.run("hello", random_seed=2, max_tokens=12, temperature=0)
    assert result.finish_reason in ("length", "stop")
    assert len(result.token_ids) <= 12


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("max_tokens", 0, "max_tokens: must be in [1,"),
        ("temperature", -1.0, "temperature: must be in [0.0,"),
        ("top_p", 0.0, "top_p: must be in (0.0,"),
        ("repetition_penalty", "x", "repetition_penalty: must be a number"),
        ("scheduler", "euler", "scheduler: must be one of"),
    ],
)
def test_invalid_parameters_name_the_field(reference_pipeline, field, value, message):
    with pytest.raises(InvalidRequest, match=None) as info:
        reference_pipeline.request("hi", **{field: value})
    assert message in str(info.value)


def test_empty_and_too_long_prompts_are_refused(reference_pipeline):
    with pytest.raises(InvalidRequest, match="text_input: must not be empty"):
        reference_pipeline.request("   ")
    request = reference_pipeline.request("word " * 3000, max_tokens=1000)
    with pytest.raises(InvalidRequest, match="the context is 1024"):
        reference_pipeline.prompts.prompt_ids(request)


def test_tiny_weights_are_reproducible(tmp_path, tiny_weights):
    again = build_tiny_weights(tmp_path / "again", seed=0)
    other = build_tiny_weights(tmp_path / "other", seed=1)
    for name in ("llm", "unet"):
        a, b, c = (WeightsDir(p).state_dict(name) for p in (tiny_weights, again, other))
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a)
        assert not all(torch.equal(a[k], c[k]) for k in a)


def test_weights_dir_rejects_incomplete_layout(tmp_path, tiny_weights):
    with pytest.raises(FileNotFoundError, match="no manifest.json"):
        WeightsDir(tmp_path)
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(tiny_weights, copy)
    (copy / "unet.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="unet.safetensors"):
        WeightsDir(copy)


def test_run_command_shows_the_diffusion_steps(tiny_weights, tmp_path, capsys):
    from minigpt5 import cli

    assert (
        cli.main(
            [
                "run",
                "--weights",
                str(tiny_weights),
                "--prompt",
                "A dog.",
                "--force-image",
                "--steps",
                "3",
                "--scheduler",
                "dpm",
                "--max-tokens",
                "4",
                "--seed",
                "1",
                "--out",
                str(tmp_path),
            ]
        )
        == 0
    )
    error = capsys.readouterr().err
    assert "image 1" in error and "3/3" in error  # a progress bar per image, on stderr
    assert (tmp_path / "image_1.png").is_file()


def test_random_weights_are_for_the_real_sizes_only(tmp_path):
    from minigpt5.weights.random_weights import build_random_weights

    with pytest.raises(ValueError, match="full, slim"):
        build_random_weights(tmp_path, "tiny")
    with pytest.raises(ValueError, match="bf16"):
        build_random_weights(tmp_path, "slim", dtype="int8")
