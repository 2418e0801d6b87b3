"""Architecture presets: `full` (the real MiniGPT-5 dims), `slim` (the real widths with the fewest layers
that still run every code path) and `tiny` (seconds on a CPU).

A preset is plain JSON-able data: it is written into every weights manifest, so a weights directory
fully describes the modules to build. Each component dict holds the keyword arguments of the
transformers / diffusers config class it feeds.
"""

from __future__ import annotations

import copy
from typing import Any

# Special tokens added to the Vicuna vocabulary (upstream eric-ai-lab/MiniGPT-5 constants.py:15-17, mini_gpt5.py:48).
VOKEN_TOKENS = tuple(f"[IMG{i}]" for i in range(8))
IMAGE_PLACEHOLDER = "<ImageHere>"
NUM_VOKENS = len(VOKEN_TOKENS)
NUM_QUERY_TOKENS = 32
NUM_T2I_QUERIES = 77  # SD's text-encoder sequence length

# CLIP normalisation used by BLIP-2's image processor.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
VISION_IMAGE_SIZE = 224

# BLIP-2's `ln_vision` is a plain torch LayerNorm (default eps 1e-5), unlike the ViT's own norms (1e-6):
# upstream minigpt4/models/blip2.py:69 `LayerNorm(visual_encoder.num_features)`.
LN_VISION_EPS = 1e-5

# Upstream's LoraConfig(r=8, lora_alpha=16) for the LLM; the converter reads r from the lora_A shapes.
UPSTREAM_LORA_ALPHA = 16.0

# The two training formats of upstream's stage 2 and their system prompts, verbatim from upstream
# eric-ai-lab/MiniGPT-5 dataloader.py (VIST: lines 236-237; MMDialog: lines 318-319). prompt.py renders them.
PROMPT_FORMATS = {
    "vist": (
        "Give the following images in <Img>ImageContent</Img> format. You will be able to see the images "
        "once I provide it to you. Please understanding images and generate story."
    ),
    "mmdialog": (
        "Give the following images in <Img>ImageContent</Img> format. You will be able to see the "
        "images once I provide it to you. Please generate conversations with appropriate images."
    ),
}
SYSTEM_PROMPT = PROMPT_FORMATS["vist"]

# BOS each checkpoint was trained with (docs/CONVERT.md, "BOS"): the stage-1 and VIST checkpoints come from
# upstream's first release, whose mini_gpt5.py:25 sets DEFAULT_BOS_TOKEN = "</s>" (added at lines 52-53 and
# prepended by input_warp, lines 182-184); the MMDialog checkpoint was re-released on 2024-03-18 (commit
# 2121c74), four days after commit 21308c1 commented that override out, so it was trained with "<s>".
DEFAULT_BOS = {"vist": "</s>", "mmdialog": "<s>"}

# Upstream's effective generation defaults; docs/API.md lists each with its upstream source.
DEFAULT_GENERATION = {
    "max_tokens": 256,  # model.py:302 max_new_tokens=256 (sampled ids: the 7 forced vokens do not count)
    "temperature": 1.0,  # model.py:307
    "top_p": 0.9,  # mini_gpt5.py:287
    "top_k": 50,  # not passed: transformers 4.31's GenerationConfig default (requirements.txt pins 4.31.0)
    "repetition_penalty": 2.0,  # model.py:307
    "force_image": False,  # model.py:302 force_generation=False
    "force_image_mode": "first",  # generation_helper.py:208-211: [IMG0] as soon as none was generated
    "max_images": 1,  # model.py:316-317 renders the first voken block only
    "guidance_scale": 7.5,  # model.py:302
    "num_inference_steps": 50,  # diffusers StableDiffusionPipeline's default (model.py:328 passes none)
    "scheduler": "pndm",  # SD 2.1-base's scheduler_config (PNDMScheduler)
}

# Stable Diffusion 2.1-base's PNDM setup (its scheduler_config.json); DPM-Solver++ shares the betas.
SCHEDULER = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "steps_offset": 1,
}

_FULL: dict[str, dict[str, Any]] = {
    "vision": {  # EVA ViT-g/14 as transformers' Blip2VisionConfig
        "hidden_size": 1408,
        "intermediate_size": 6144,
        "num_hidden_layers": 39,
        "num_attention_heads": 16,
        "image_size": 224,
        "patch_size": 14,
        "layer_norm_eps": 1e-6,
        "qkv_bias": True,
        "hidden_act": "gelu",
    },
    "qformer": {
        "hidden_size": 768,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "intermediate_size": 3072,
        "cross_attention_frequency": 2,
        "encoder_hidden_size": 1408,
        "vocab_size": 30522,
        "max_position_embeddings": 512,
    },
    "llm": {  # Vicuna-7B (LLaMA-7B shape); vocab_size comes from the tokenizer
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "rms_norm_eps": 1e-6,
        "max_position_embeddings": 2048,
        "tie_word_embeddings": False,
    },
    "mapper": {
        "d_model": 1024,
        "nhead": 8,
        "num_encoder_layers": 4,
        "num_decoder_layers": 4,
        "dim_feedforward": 4096,
        "num_queries": NUM_T2I_QUERIES,
    },
    "unet": {  # SD 2.1-base
        "sample_size": 64,
        "in_channels": 4,
        "out_channels": 4,
        "layers_per_block": 2,
        "block_out_channels": [320, 640, 1280, 1280],
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        "cross_attention_dim": 1024,
        "attention_head_dim": [5, 10, 20, 20],
        "use_linear_projection": True,
    },
    "vae": {
        "in_channels": 3,
        "out_channels": 3,
        "latent_channels": 4,
        "layers_per_block": 2,
        "block_out_channels": [128, 256, 512, 512],
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
        "sample_size": 512,
        "scaling_factor": 0.18215,
    },
}

_TINY = {
    "vision": {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "image_size": 224,
        "patch_size": 14,
        "layer_norm_eps": 1e-6,
        "qkv_bias": True,
        "hidden_act": "gelu",
    },
    "qformer": {
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "intermediate_size": 64,
        "cross_attention_frequency": 2,
        "encoder_hidden_size": 32,
        "vocab_size": 64,
        "max_position_embeddings": 64,
    },
    "llm": {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "rms_norm_eps": 1e-6,
        "max_position_embeddings": 1024,
        "tie_word_embeddings": False,
    },
    "mapper": {
        "d_model": 32,
        "nhead": 4,
        "num_encoder_layers": 2,
        "num_decoder_layers": 2,
        "dim_feedforward": 64,
        "num_queries": NUM_T2I_QUERIES,
    },
    "unet": {
        "sample_size": 16,
        "in_channels": 4,
        "out_channels": 4,
        "layers_per_block": 1,
        "block_out_channels": [32, 64],
        "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
        "cross_attention_dim": 32,
        "attention_head_dim": 8,
        "norm_num_groups": 8,
        "use_linear_projection": True,
    },
    "vae": {
        "in_channels": 3,
        "out_channels": 3,
        "latent_channels": 4,
        "layers_per_block": 1,
        "block_out_channels": [16, 32],
        "down_block_types": ["DownEncoderBlock2D"] * 2,
        "up_block_types": ["UpDecoderBlock2D"] * 2,
        "norm_num_groups": 8,
        "sample_size": 32,
        "scaling_factor": 0.18215,
    },
}


def _slim() -> dict:
    """`full` with its widths (LLM 4096, ViT 1408, Q-Former 768, mapper 1024, SD 2.1-base UNet and VAE
    blocks) and the fewest layers that still run every code path: one ViT and one LLaMA layer, two
    Q-Former layers (one with cross-attention, one without), one mapper encoder and decoder layer, one
    resnet per UNet / VAE block (all four block types, the mid blocks and every attention kept)."""
    slim = copy.deepcopy(_FULL)
    slim["vision"]["num_hidden_layers"] = 1
    slim["qformer"]["num_hidden_layers"] = slim["qformer"]["cross_attention_frequency"]
    slim["llm"]["num_hidden_layers"] = 1
    slim["mapper"].update(num_encoder_layers=1, num_decoder_layers=1)
    slim["unet"]["layers_per_block"] = 1
    slim["vae"]["layers_per_block"] = 1
    return slim


PRESETS = {"full": _FULL, "slim": _slim(), "tiny": _TINY}


def preset(name: str) -> dict:
    """A deep copy of a preset's architecture dict (`vision`, `qformer`, `llm`, `mapper`, `unet`, `vae`)."""
    try:
        return copy.deepcopy(PRESETS[name])
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}") from None


def vae_scale_factor(vae: dict) -> int:
    return 2 ** (len(vae["block_out_channels"]) - 1)


def image_size(arch: dict) -> int:
    """Side of the generated image in pixels (512 for SD 2.1-base)."""
    return arch["unet"]["sample_size"] * vae_scale_factor(arch["vae"])
