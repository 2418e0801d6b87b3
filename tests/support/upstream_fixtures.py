"""Synthetic upstream-format files at tiny dims, for the converter tests.

No real MiniGPT-5 checkpoint exists on our machines, so these files are written with the upstream key names
as read from upstream code (MiniGPT-5 model.py / mini_gpt5.py; LAVIS eva_vit.py / blip2; transformers' BLIP-2 conversion
script; PEFT's naming), from reference modules whose outputs the converted weights must reproduce:

    vicuna/           LlamaForCausalLM.save_pretrained + the tiny tokenizer without the MiniGPT-5 tokens
    stage1.ckpt       Lightning {"state_dict": ...}: full embed_tokens/lm_head, fc.*, llm_to_t2i_mapping.*,
                      t2i_decoder_prompt
    stage2.ckpt       PEFT LoRA A/B of q_proj/v_proj, modules_to_save copies, llm_to_t2i_mapping.*
    blip2.pth         LAVIS {"model": ...}: query_tokens, ln_vision, Qformer.bert.* (+ text-only parts, t5_proj);
                      write_hf_blip2 writes the same as a transformers BLIP-2 folder
    eva_vit_g.pth     LAVIS EVA ViT (q_bias/v_bias separate) with one block more than the model uses
    minigpt4.pth      {"model": {llama_proj.*}}
    sd/unet, sd/vae   diffusers save_pretrained; the VAE mid-block attention under its pre-0.14 names
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from safetensors.torch import load_file, save_file
from transformers import LlamaForCausalLM

from minigpt5 import components
from minigpt5 import tokenizer as tokenizer_module
from minigpt5.config import NUM_VOKENS, preset

LORA_RANK = 8
LORA_ALPHA = 16.0
NUM_ADDED_TOKENS = NUM_VOKENS + 1  # [IMG0]..[IMG7], <ImageHere>
STAGE_LLM = "model.llama_model."  # Lightning attribute `model`, MiniGPT5 attribute `llama_model`
PEFT_LLM = STAGE_LLM + "base_model.model."


@dataclass
class UpstreamFiles:
    root: Path
    arch: dict
    vision: torch.nn.Module  # reference VisionTower the LAVIS files were written from
    base_vocab_size: int
    stage1: dict  # the state dicts written into the .ckpt files
    stage2: dict
    eva: dict  # the eva_vit_g.pth state dict

    def path(self, name: str) -> Path:
        return self.root / name

    def cli_args(self, out: Path, **replace: Path | None) -> list[str]:
        """`minigpt5 weights convert` arguments; `replace` swaps (or with None drops) one file flag."""
        files = {
            "stage1": "stage1.ckpt",
            "stage2": "stage2.ckpt",
            "vicuna": "vicuna",
            "blip2": "blip2.pth",
            "eva-vit": "eva_vit_g.pth",
            "minigpt4-proj": "minigpt4.pth",
            "sd": "sd",
        }
        chosen = {flag: self.path(name) for flag, name in files.items()}
        chosen.update({flag.replace("_", "-"): path for flag, path in replace.items()})
        args = [arg for flag, path in chosen.items() if path is not None for arg in (f"--{flag}", str(path))]
        return [*args, "--out", str(out), "--preset", "tiny", "--dtype", "fp32"]


def build_upstream_files(root: Path) -> UpstreamFiles:
    root.mkdir(parents=True, exist_ok=True)
    arch = preset("tiny")
    base_vocab_size = _write_vicuna(root / "vicuna", arch)
    vocab_size = base_vocab_size + NUM_ADDED_TOKENS
    stage1 = _stage1_state(arch, vocab_size)
    stage2 = _stage2_state(arch, vocab_size)
    torch.save(
        {
            "state_dict": stage1,
            "epoch": 1,
            "global_step": 100,
            "pytorch-lightning_version": "2.0.2",
            "hyper_parameters": {"learning_rate": 2e-5, "gpus": [0, 1]},
        },
        root / "stage1.ckpt",
    )
    torch.save({"state_dict": stage2, "epoch": 1, "global_step": 50}, root / "stage2.ckpt")
    vision = _reference_vision(arch)
    eva = lavis_eva_state(vision, extra_block=True)
    torch.save(eva, root / "eva_vit_g.pth")
    torch.save({"model": lavis_blip2_state(vision, arch)}, root / "blip2.pth")
    torch.save(
        {
            "model": {
                "llama_proj.weight": vision.llama_proj.weight.detach().clone(),
                "llama_proj.bias": vision.llama_proj.bias.detach().clone(),
            }
        },
        root / "minigpt4.pth",
    )
    _write_stable_diffusion(root / "sd", arch)
    return UpstreamFiles(root, arch, vision, base_vocab_size, stage1, stage2, eva)


def base_tokenizer():
    """The tiny tokenizer as a plain LLaMA-like tokenizer: without the MiniGPT-5 tokens."""
    with mock.patch.object(tokenizer_module, "add_minigpt5_tokens", lambda tok: tok):
        return tokenizer_module.build_tiny_tokenizer()


def _write_vicuna(folder: Path, arch: dict) -> int:
    tokenizer = base_tokenizer()
    tokenizer.save_pretrained(str(folder))
    torch.manual_seed(1)
    llm_arch = {**arch["llm"], "vocab_size": len(tokenizer)}
    LlamaForCausalLM(components.llm_config({"llm": llm_arch})).save_pretrained(str(folder))
    return len(tokenizer)


def _random_mapper_state(arch: dict, seed: int) -> dict:
    torch.manual_seed(seed)
    mapper = components.build("mapper", arch)
    torch.nn.init.normal_(mapper.t2i_decoder_prompt, std=0.02)
    return {k: v.detach().clone() for k, v in mapper.state_dict().items()}


def _stage1_state(arch: dict, vocab_size: int) -> dict:
    torch.manual_seed(2)
    hidden = arch["llm"]["hidden_size"]
    state = {
        f"{STAGE_LLM}model.embed_tokens.weight": torch.randn(vocab_size, hidden) * 0.02,
        f"{STAGE_LLM}lm_head.weight": torch.randn(vocab_size, hidden) * 0.02,
    }
    return state | _random_mapper_state(arch, seed=3)


def _stage2_state(arch: dict, vocab_size: int) -> dict:
    torch.manual_seed(4)
    llm = arch["llm"]
    hidden, heads, kv_heads = llm["hidden_size"], llm["num_attention_heads"], llm["num_key_value_heads"]
    out_features = {"q_proj": hidden, "v_proj": hidden * kv_heads // heads}
    state = {}
    for layer in range(llm["num_hidden_layers"]):
        for proj, out in out_features.items():
            prefix = f"{PEFT_LLM}model.layers.{layer}.self_attn.{proj}"
            state[f"{prefix}.lora_A.default.weight"] = torch.randn(LORA_RANK, hidden) * 0.05
            state[f"{prefix}.lora_B.default.weight"] = torch.randn(out, LORA_RANK) * 0.05  # nonzero: trained
    for module in ("model.embed_tokens", "lm_head"):
        state[f"{PEFT_LLM}{module}.modules_to_save.default.weight"] = torch.randn(vocab_size, hidden) * 0.02
        # PEFT's frozen original; upstream drops frozen tensors, kept here to exercise the ignore rule
        state[f"{PEFT_LLM}{module}.original_module.weight"] = torch.zeros(vocab_size, hidden)
    mapping = _random_mapper_state(arch, seed=5)
    return state | {k: v for k, v in mapping.items() if k.startswith("llm_to_t2i_mapping.")}


def _reference_vision(arch: dict) -> torch.nn.Module:
    torch.manual_seed(6)
    vision = components.build("vision", arch).eval()
    # Re-draw everything: Blip2VisionConfig initialises its weights at std 1e-10, which would leave the ViT
    # blind to its attention (a swapped q/v bias would not show); LayerNorms away from (1, 0) likewise.
    with torch.no_grad():
        for name, param in vision.named_parameters():
            param.normal_(std=0.05)
            if "norm" in name.lower() and name.endswith("weight"):
                param.add_(1.0)
            if name.endswith("self_attn.qkv.bias"):
                param.chunk(3)[1].zero_()  # EVA has no k bias
    return vision


def lavis_eva_state(vision: torch.nn.Module, extra_block: bool = False) -> dict:
    """The ViT of `vision` under LAVIS EVA names (bare, as in eva_vit_g.pth)."""
    hf = {
        k.removeprefix("vision_model."): v.detach().clone()
        for k, v in vision.state_dict().items()
        if k.startswith("vision_model.") and "post_layernorm" not in k
    }
    eva = {
        "cls_token": hf["embeddings.class_embedding"],
        "pos_embed": hf["embeddings.position_embedding"],
        "patch_embed.proj.weight": hf["embeddings.patch_embedding.weight"],
        "patch_embed.proj.bias": hf["embeddings.patch_embedding.bias"],
    }
    depth = vision.vision_model.config.num_hidden_layers
    for i in range(depth):
        layer = f"encoder.layers.{i}."
        block = f"blocks.{i}."
        q_bias, _, v_bias = hf[layer + "self_attn.qkv.bias"].chunk(3)
        eva |= {
            block + "attn.qkv.weight": hf[layer + "self_attn.qkv.weight"],
            block + "attn.q_bias": q_bias.clone(),
            block + "attn.v_bias": v_bias.clone(),
        }
        for ours, theirs in (
            ("layer_norm1", "norm1"),
            ("layer_norm2", "norm2"),
            ("self_attn.projection", "attn.proj"),
            ("mlp.fc1", "mlp.fc1"),
            ("mlp.fc2", "mlp.fc2"),
        ):
            for kind in ("weight", "bias"):
                eva[f"{block}{theirs}.{kind}"] = hf[f"{layer}{ours}.{kind}"]
    if extra_block:  # EVA-CLIP-g's last block, which BLIP-2 drops
        eva |= {
            k.replace("blocks.0.", f"blocks.{depth}."): torch.randn_like(v)
            for k, v in eva.items()
            if k.startswith("blocks.0.")
        }
    return eva


def lavis_blip2_state(vision: torch.nn.Module, arch: dict) -> dict:
    """Q-Former, query_tokens and ln_vision of `vision` under LAVIS BLIP-2 names, plus the text-only
    Q-Former parts and the T5 projection that a blip2_pretrained_flant5xxl.pth may hold."""
    state = {k: v.detach().clone() for k, v in vision.state_dict().items()}
    blip2 = {
        "query_tokens": state["query_tokens"],
        "ln_vision.weight": state["vision_model.post_layernorm.weight"],
        "ln_vision.bias": state["vision_model.post_layernorm.bias"],
        "Qformer.bert.embeddings.LayerNorm.weight": state["qformer.layernorm.weight"],
        "Qformer.bert.embeddings.LayerNorm.bias": state["qformer.layernorm.bias"],
    }
    for key, value in state.items():
        if key.startswith("qformer.encoder."):
            lavis = "Qformer.bert." + key.removeprefix("qformer.").replace("attention.attention.", "attention.self.")
            blip2[lavis] = value
    q = arch["qformer"]
    positions = q["max_position_embeddings"]
    blip2 |= {
        "Qformer.bert.embeddings.word_embeddings.weight": torch.randn(q["vocab_size"], q["hidden_size"]),
        "Qformer.bert.embeddings.position_embeddings.weight": torch.randn(positions, q["hidden_size"]),
        "Qformer.bert.embeddings.position_ids": torch.arange(positions).unsqueeze(0),
        "t5_proj.weight": torch.randn(16, q["hidden_size"]),
        "t5_proj.bias": torch.randn(16),
    }
    for i in range(q["num_hidden_layers"]):
        text_ffn = f"Qformer.bert.encoder.layer.{i}."
        blip2 |= {
            text_ffn + "intermediate.dense.weight": torch.randn(q["intermediate_size"], q["hidden_size"]),
            text_ffn + "output.dense.weight": torch.randn(q["hidden_size"], q["intermediate_size"]),
            text_ffn + "output.LayerNorm.weight": torch.randn(q["hidden_size"]),
        }
    return blip2


def write_hf_blip2(folder: Path, vision: torch.nn.Module, arch: dict) -> Path:
    """`vision`'s ViT, Q-Former and query tokens as a transformers BLIP-2 folder (with the BLIP-2 language
    projection the converter must skip)."""
    folder.mkdir(parents=True)
    state = {k: v.detach().clone() for k, v in vision.state_dict().items() if not k.startswith("llama_proj.")}
    state |= {
        "language_projection.weight": torch.randn(16, arch["qformer"]["hidden_size"]),
        "language_projection.bias": torch.randn(16),
    }
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = {"model_type": "blip-2", "vision_config": arch["vision"], "qformer_config": arch["qformer"]}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def _write_stable_diffusion(folder: Path, arch: dict) -> None:
    torch.manual_seed(7)
    UNet2DConditionModel(**arch["unet"]).save_pretrained(str(folder / "unet"))
    torch.manual_seed(8)
    AutoencoderKL(**arch["vae"]).save_pretrained(str(folder / "vae"))
    _rename_to_pre_014_attention(folder / "vae" / "diffusion_pytorch_model.safetensors")


def _rename_to_pre_014_attention(path: Path) -> None:
    old_names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    state = load_file(str(path))
    renamed = {}
    for key, value in state.items():
        if ".mid_block.attentions." in key:
            for new, old in old_names.items():
                key = key.replace(f".{new}.", f".{old}.")
        renamed[key] = value
    save_file(renamed, str(path), metadata={"format": "pt"})


def eva_forward(
    eva: dict,
    ln_vision: dict,
    pixels: torch.Tensor,
    depth: int,
    num_heads: int,
    eps: float = 1e-6,
    ln_vision_eps: float = 1e-5,
) -> torch.Tensor:
    """The first `depth` blocks of a LAVIS EVA ViT + ln_vision, written out from lavis/models/eva_vit.py:
    a check of the name mapping and of EVA's qkv bias = cat(q_bias, 0, v_bias) that does not go through
    transformers' modules. The blocks' norms use eps 1e-6 (eva_vit.py's partial(nn.LayerNorm, eps=1e-6));
    ln_vision is a default torch LayerNorm, eps 1e-5 (upstream MiniGPT-5 minigpt4/models/blip2.py:69)."""
    F = torch.nn.functional
    patch = eva["patch_embed.proj.weight"]
    x = F.conv2d(pixels, patch, eva["patch_embed.proj.bias"], stride=patch.shape[-1]).flatten(2).transpose(1, 2)
    x = torch.cat([eva["cls_token"].expand(x.shape[0], -1, -1), x], dim=1) + eva["pos_embed"]
    batch, tokens, width = x.shape
    for block in range(depth):
        p = {k.removeprefix(f"blocks.{block}."): v for k, v in eva.items() if k.startswith(f"blocks.{block}.")}
        h = F.layer_norm(x, (width,), p["norm1.weight"], p["norm1.bias"], eps)
        bias = torch.cat([p["attn.q_bias"], torch.zeros_like(p["attn.v_bias"]), p["attn.v_bias"]])
        qkv = F.linear(h, p["attn.qkv.weight"], bias).reshape(batch, tokens, 3, num_heads, -1).permute(2, 0, 3, 1, 4)
        attn = (qkv[0] * (width // num_heads) ** -0.5 @ qkv[1].transpose(-2, -1)).softmax(dim=-1)
        x = x + F.linear(
            (attn @ qkv[2]).transpose(1, 2).reshape(batch, tokens, width), p["attn.proj.weight"], p["attn.proj.bias"]
        )
        h = F.layer_norm(x, (width,), p["norm2.weight"], p["norm2.bias"], eps)
        x = x + F.linear(
            F.gelu(F.linear(h, p["mlp.fc1.weight"], p["mlp.fc1.bias"])), p["mlp.fc2.weight"], p["mlp.fc2.bias"]
        )
    return F.layer_norm(x, (width,), ln_vision["weight"], ln_vision["bias"], ln_vision_eps)
