"""`minigpt5 weights convert` on synthetic upstream-format files (tests/support/upstream_fixtures.py).

No real MiniGPT-5 checkpoint exists on our machines: these tests show the converter is right for files
with the upstream key names as read from upstream code, at tiny dims (docs/CONVERT.md).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import weakref

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from safetensors.torch import load_file
from transformers import LlamaForCausalLM

from minigpt5 import components
from minigpt5.config import IMAGE_PLACEHOLDER, VOKEN_TOKENS
from minigpt5.weights import convert as convert_module
from minigpt5.weights.convert import DTYPES, ConversionError, ConvertOptions, convert, load_pickle, plan
from minigpt5.weights.convert_args import add_convert_arguments
from minigpt5.weights.layout import WeightsDir, component_file, save_weights
from support.upstream_fixtures import (
    LORA_ALPHA,
    LORA_RANK,
    NUM_ADDED_TOKENS,
    PEFT_LLM,
    STAGE_LLM,
    build_upstream_files,
    eva_forward,
    write_hf_blip2,
)


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="minigpt5 weights convert")
    add_convert_arguments(parser)
    return parser.parse_args(argv)


def options(argv: list[str]) -> ConvertOptions:
    return ConvertOptions.from_namespace(parse(argv))


@pytest.fixture(scope="module")
def upstream(tmp_path_factory):
    return build_upstream_files(tmp_path_factory.mktemp("upstream"))


@pytest.fixture(scope="module")
def converted(upstream, tmp_path_factory) -> WeightsDir:
    out = tmp_path_factory.mktemp("converted") / "weights"
    args = parse(upstream.cli_args(out))
    assert args.handler(args) == 0
    return WeightsDir(out)


@pytest.fixture
def images():
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (2, 224, 224, 3), dtype=torch.uint8, generator=generator)


def write_ckpt(path, state: dict):
    torch.save({"state_dict": state}, path)
    return path


# ---- round trip: upstream files → layout → modules equal to references built from the same tensors


def test_vision_tower_equals_the_reference_it_was_written_from(converted, upstream, images):
    torch.testing.assert_close(converted.load("vision")(images), upstream.vision(images))


def test_vit_equals_lavis_eva_computed_by_hand(converted, upstream, images):
    vision = converted.load("vision")
    pixels = vision.normalize(images)
    blip2 = torch.load(upstream.path("blip2.pth"), weights_only=True)["model"]
    ln_vision = {"weight": blip2["ln_vision.weight"], "bias": blip2["ln_vision.bias"]}
    config = upstream.arch["vision"]
    expected = eva_forward(upstream.eva, ln_vision, pixels, config["num_hidden_layers"], config["num_attention_heads"])
    with torch.no_grad():
        actual = vision.vision_model(pixel_values=pixels).last_hidden_state
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5)


def reference_llm(upstream) -> torch.nn.Module:
    """Vicuna base + stage-2 embed/lm_head copies, with LoRA applied at run time the way PEFT does
    (unmerged: q_proj(x) + alpha/r · B(A(x))), not by merging weights."""
    llm_arch = {**upstream.arch["llm"], "vocab_size": upstream.base_vocab_size + NUM_ADDED_TOKENS}
    model = LlamaForCausalLM(components.llm_config({"llm": llm_arch})).eval()
    state = load_file(str(upstream.path("vicuna") / "model.safetensors"))
    state["model.embed_tokens.weight"] = upstream.stage2[f"{PEFT_LLM}model.embed_tokens.modules_to_save.default.weight"]
    state["lm_head.weight"] = upstream.stage2[f"{PEFT_LLM}lm_head.modules_to_save.default.weight"]
    model.load_state_dict(state, strict=True)
    scale = LORA_ALPHA / LORA_RANK
    for index, layer in enumerate(model.model.layers):
        for proj in ("q_proj", "v_proj"):
            prefix = f"{PEFT_LLM}model.layers.{index}.self_attn.{proj}"
            a = upstream.stage2[f"{prefix}.lora_A.default.weight"]
            b = upstream.stage2[f"{prefix}.lora_B.default.weight"]
            getattr(layer.self_attn, proj).register_forward_hook(
                lambda module, inputs, output, a=a, b=b: output + scale * (inputs[0] @ a.T @ b.T)
            )
    return model


def test_llm_logits_equal_base_plus_lora_reference(converted, upstream):
    vocab = upstream.base_vocab_size + NUM_ADDED_TOKENS
    ids = torch.tensor([[1, 5, 17, 300, vocab - 9, vocab - 2, vocab - 1]])  # includes [IMG0], [IMG7], <ImageHere>
    with torch.no_grad():
        actual = converted.load("llm")(input_ids=ids).logits
        expected = reference_llm(upstream)(input_ids=ids).logits
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5)


def test_mapper_is_stage1_with_stage2_transformer(converted, upstream):
    reference = components.build("mapper", converted.arch).eval()
    reference.load_state_dict(upstream.stage1, strict=False)  # fc.*, t2i_decoder_prompt (+ its transformer)
    reference.load_state_dict(
        {k: v for k, v in upstream.stage2.items() if k.startswith("llm_to_t2i_mapping.")}, strict=False
    )
    voken_states = torch.randn(2, 8, upstream.arch["llm"]["hidden_size"])
    torch.testing.assert_close(converted.load("mapper")(voken_states), reference(voken_states))


def test_unet_and_vae_equal_diffusers_own_loading(converted, upstream):
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, 16, 16, generator=generator)
    condition = torch.randn(1, 77, upstream.arch["unet"]["cross_attention_dim"], generator=generator)
    with torch.no_grad():
        unet = UNet2DConditionModel.from_pretrained(str(upstream.path("sd") / "unet")).eval()
        torch.testing.assert_close(
            converted.load("unet")(latents, 10, condition).sample, unet(latents, 10, condition).sample
        )
        # diffusers renames the VAE's pre-0.14 attention names itself: an independent check of our rule
        vae = AutoencoderKL.from_pretrained(str(upstream.path("sd") / "vae")).eval()
        torch.testing.assert_close(
            converted.load("vae").decode(latents[:, :, :8, :8]).sample, vae.decode(latents[:, :, :8, :8]).sample
        )


def test_hf_blip2_folder_replaces_the_lavis_files(upstream, tmp_path, images):
    blip2 = write_hf_blip2(tmp_path / "blip2-hf", upstream.vision, upstream.arch)
    convert(options(upstream.cli_args(tmp_path / "out", blip2=blip2, eva_vit=None)))
    torch.testing.assert_close(WeightsDir(tmp_path / "out").load("vision")(images), upstream.vision(images))


def test_manifest_tokens_and_tokenizer(converted, upstream):
    tokenizer = converted.tokenizer()
    vocab = upstream.base_vocab_size + NUM_ADDED_TOKENS
    assert len(tokenizer) == vocab == converted.arch["llm"]["vocab_size"]
    added = tokenizer.convert_tokens_to_ids([*VOKEN_TOKENS, IMAGE_PLACEHOLDER])
    assert added == list(range(upstream.base_vocab_size, vocab))
    assert converted.tokens["vokens"] == added[:8] and converted.tokens["image_placeholder"] == added[8]
    # stage2.ckpt is a VIST-era checkpoint by default: upstream's first release prepended </s> (docs/CONVERT.md)
    assert converted.tokens["bos"] == "</s>" and converted.prompt_format[0] == "vist"
    source = converted.manifest["source"]
    assert source["kind"] == "upstream-convert" and source["lora"] == {"ranks": [LORA_RANK], "alpha": LORA_ALPHA}


# ---- errors: reported by name, nothing written

UNKNOWN_KEY = "model.prefix_encoder.embedding.weight"  # upstream's unused prefix-tuning option


def test_unknown_key_fails_with_its_name(upstream, tmp_path, capsys):
    stage2 = write_ckpt(tmp_path / "stage2.ckpt", {**upstream.stage2, UNKNOWN_KEY: torch.ones(5, 64)})
    args = parse(upstream.cli_args(tmp_path / "out", stage2=stage2))
    assert args.handler(args) == 2
    error = capsys.readouterr().err
    assert "unknown keys" in error and f"--stage2 {stage2}: {UNKNOWN_KEY}" in error
    assert not (tmp_path / "out").exists()


def test_mmdialog_checkpoint_gets_its_format_and_bos(upstream, tmp_path):
    stage2 = write_ckpt(tmp_path / "stage2_mmdialog.ckpt", upstream.stage2)
    convert(options(upstream.cli_args(tmp_path / "out", stage2=stage2)))
    weights = WeightsDir(tmp_path / "out")
    assert weights.prompt_format[0] == "mmdialog" and "generate conversations" in weights.prompt_format[1]
    assert weights.tokens["bos"] == "<s>"


def test_allow_unknown_warns_and_converts_in_fp16_with_chosen_bos(upstream, tmp_path, capsys):
    stage2 = write_ckpt(tmp_path / "stage2.ckpt", {**upstream.stage2, UNKNOWN_KEY: torch.ones(5, 64)})
    argv = upstream.cli_args(tmp_path / "out", stage2=stage2) + ["--allow-unknown", "--bos", "<s>", "--dtype", "fp16"]
    args = parse(argv)
    assert args.handler(args) == 0
    assert f"WARNING unknown key skipped: --stage2 {UNKNOWN_KEY}" in capsys.readouterr().out
    weights = WeightsDir(tmp_path / "out")
    assert weights.tokens["bos"] == "<s>"
    assert weights.tokens["bos_id"] == weights.tokenizer().convert_tokens_to_ids("<s>")
    assert {t.dtype for t in weights.state_dict("llm").values()} == {torch.float16}
    weights.load("llm")  # strict load


def test_missing_key_fails_with_its_name(upstream, tmp_path):
    without = {k: v for k, v in upstream.stage1.items() if k != "t2i_decoder_prompt"}
    stage1 = write_ckpt(tmp_path / "stage1.ckpt", without)
    with pytest.raises(ConversionError, match=r"missing tensors[^$]*mapper: t2i_decoder_prompt"):
        convert(options(upstream.cli_args(tmp_path / "out", stage1=stage1)))
    assert not (tmp_path / "out").exists()


def test_vit_is_missing_without_eva_file(upstream, tmp_path):
    with pytest.raises(ConversionError, match=r"vision: vision_model\.embeddings\.class_embedding"):
        convert(options(upstream.cli_args(tmp_path / "out", eva_vit=None)))


def test_lora_half_is_reported(upstream, tmp_path):
    lora_b = f"{PEFT_LLM}model.layers.1.self_attn.v_proj.lora_B.default.weight"
    stage2 = write_ckpt(tmp_path / "stage2.ckpt", {k: v for k, v in upstream.stage2.items() if k != lora_b})
    with pytest.raises(ConversionError, match=r"model\.layers\.1\.self_attn\.v_proj\.weight: missing lora_B"):
        convert(options(upstream.cli_args(tmp_path / "out", stage2=stage2)))


def test_stage1_vocabulary_must_match_the_tokenizer(upstream, tmp_path):
    short = {k: (v[:-1] if k.startswith(STAGE_LLM) else v) for k, v in upstream.stage1.items()}
    stage1 = write_ckpt(tmp_path / "stage1.ckpt", short)
    vocab = upstream.base_vocab_size + NUM_ADDED_TOKENS
    with pytest.raises(ConversionError, match=f"tokenizer has {vocab} tokens.*embedding has \\[{vocab - 1}\\] rows"):
        convert(options(upstream.cli_args(tmp_path / "out", stage1=stage1, stage2=None)))


class NotATensor:
    pass


def test_pickle_with_an_object_is_refused_by_weights_only(upstream, tmp_path):
    proj = torch.load(upstream.path("minigpt4.pth"), weights_only=True)
    torch.save({**proj, "config": NotATensor()}, tmp_path / "minigpt4.pth")
    with pytest.raises(ConversionError, match=r"minigpt4\.pth: refused by torch\.load\(weights_only=True\)"):
        convert(options(upstream.cli_args(tmp_path / "out", minigpt4_proj=tmp_path / "minigpt4.pth")))


def test_pre_zipfile_pickles_load_and_are_still_restricted(tmp_path):
    torch.save({"model": {"w": torch.ones(2)}}, tmp_path / "plain.pth", _use_new_zipfile_serialization=False)
    assert torch.equal(load_pickle(tmp_path / "plain.pth")["model"]["w"], torch.ones(2))
    torch.save({"config": NotATensor()}, tmp_path / "object.pth", _use_new_zipfile_serialization=False)
    with pytest.raises(ConversionError, match="weights_only"):
        load_pickle(tmp_path / "object.pth")


def test_arguments_module_does_not_import_torch():
    code = "import sys, minigpt5.weights.convert_args; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


# ---- streaming: one module at a time, the same bytes as writing everything at once


def test_streamed_files_equal_those_written_from_every_tensor_at_once(upstream, converted, tmp_path):
    """The converter reads and writes one module at a time; the files are byte for byte those of loading
    every module first and writing them together (what it did before it streamed)."""
    opts = options(upstream.cli_args(tmp_path / "unused"))
    conversion = plan(opts)
    dtype = DTYPES[opts.dtype]
    everything = {
        name: {key: p.load().to(dtype) for key, p in conversion.tensors[name].items()} for name in components.COMPONENTS
    }
    at_once = save_weights(tmp_path / "at_once", conversion.manifest, conversion.tokenizer, everything)
    for name in components.COMPONENTS:
        file = component_file(name)
        assert (at_once / file).read_bytes() == (converted.path / file).read_bytes(), file


def test_conversion_holds_one_module_in_memory_at_a_time(upstream, tmp_path, monkeypatch):
    """Every tensor read for a module is freed before the next module is read: peak memory is the largest
    module, not the whole model (bf16: every tensor is a new one, none is a source's own)."""
    produced: list[tuple[str, list[weakref.ref]]] = []
    alive_before: dict[str, int] = {}
    original = convert_module.module_tensors

    def tracked(name, pending, dtype, progress=False):
        alive_before[name] = sum(ref().nbytes for _, refs in produced for ref in refs if ref() is not None)
        tensors = original(name, pending, dtype, progress)
        produced.append((name, [weakref.ref(t) for t in tensors.values()]))
        return tensors

    monkeypatch.setattr(convert_module, "module_tensors", tracked)
    convert(options(upstream.cli_args(tmp_path / "weights") + ["--dtype", "bf16"]))
    assert [name for name, _ in produced] == list(components.COMPONENTS)
    assert alive_before == dict.fromkeys(components.COMPONENTS, 0)
