"""Architecture presets: `full` (the real MiniGPT-5 dims, MINIGPT5.md) and `tiny` (seconds on a CPU).

A preset is plain JSON-able data: it is written into every weights manifest, so a weights directory
fully describes the modules to build. Each component dict holds the keyword arguments of the
transformers / diffusers config class it feeds.
"""
from __future__ import annotations

import copy

# Special tokens added to the Vicuna vocabulary (MINIGPT5.md §2).
VOKEN_TOKENS = tuple(f"[IMG{i}]" for i in range(8))
IMAGE_PLACEHOLDER = "<ImageHere>"
NUM_VOKENS = len(VOKEN_TOKENS)
NUM_QUERY_TOKENS = 32
NUM_T2I_QUERIES = 77  # SD's text-encoder sequence length

# CLIP normalisation used by BLIP-2's image processor (MINIGPT5.md §1).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
VISION_IMAGE_SIZE = 224

SYSTEM_PROMPT = (
    "Give the following images in <Img>ImageContent</Img> format. You will be able to see the images "
    "once I provide it to you. Please understanding images and generate story."
)

# Upstream `generate` defaults (MINIGPT5.md §2 and §5).
DEFAULT_GENERATION = {
    "max_tokens": 256,
    "temperature": 1.0,
    "top_p": 0.9,
    "top_k": 0,
    "repetition_penalty": 2.0,
    "force_image": False,
    "max_images": 1,  # one voken block per turn: what the model was trained for
    "guidance_scale": 7.5,
    "num_inference_steps": 50,
    "scheduler": "pndm",
}

# Stable Diffusion's PNDM setup (MINIGPT5.md §5); DPM-Solver++ shares the betas.
SCHEDULER = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "steps_offset": 1,
}

_FULL = {
    "vision": {  # EVA ViT-g/14 as transformers' Blip2VisionConfig
        "hidden_size": 1408, "intermediate_size": 6144, "num_hidden_layers": 39,
        "num_attention_heads": 16, "image_size": 224, "patch_size": 14,
        "layer_norm_eps": 1e-6, "qkv_bias": True, "hidden_act": "gelu",
    },
    "qformer": {
        "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
        "intermediate_size": 3072, "cross_attention_frequency": 2, "encoder_hidden_size": 1408,
        "vocab_size": 30522, "max_position_embeddings": 512,
    },
    "llm": {  # Vicuna-7B (LLaMA-7B shape); vocab_size comes from the tokenizer
        "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 32, "rms_norm_eps": 1e-6,
        "max_position_embeddings": 2048, "tie_word_embeddings": False,
    },
    "mapper": {
        "d_model": 1024, "nhead": 8, "num_encoder_layers": 4, "num_decoder_layers": 4,
        "dim_feedforward": 4096, "num_queries": NUM_T2I_QUERIES,
    },
    "unet": {  # SD 2.1-base
        "sample_size": 64, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
        "block_out_channels": [320, 640, 1280, 1280],
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        "cross_attention_dim": 1024, "attention_head_dim": [5, 10, 20, 20],
        "use_linear_projection": True,
    },
    "vae": {
        "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2,
        "block_out_channels": [128, 256, 512, 512],
        "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
        "sample_size": 512, "scaling_factor": 0.18215,
    },
}

_TINY = {
    "vision": {
        "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "image_size": 224, "patch_size": 14,
        "layer_norm_eps": 1e-6, "qkv_bias": True, "hidden_act": "gelu",
    },
    "qformer": {
        "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
        "intermediate_size": 64, "cross_attention_frequency": 2, "encoder_hidden_size": 32,
        "vocab_size": 64, "max_position_embeddings": 64,
    },
    "llm": {
        "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 4, "rms_norm_eps": 1e-6,
        "max_position_embeddings": 1024, "tie_word_embeddings": False,
    },
    "mapper": {
        "d_model": 32, "nhead": 4, "num_encoder_layers": 2, "num_decoder_layers": 2,
        "dim_feedforward": 64, "num_queries": NUM_T2I_QUERIES,
    },
    "unet": {
        "sample_size": 16, "in_channels": 4, "out_channels": 4, "layers_per_block": 1,
        "block_out_channels": [32, 64],
        "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
        "cross_attention_dim": 32, "attention_head_dim": 8, "norm_num_groups": 8,
        "use_linear_projection": True,
    },
    "vae": {
        "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 1,
        "block_out_channels": [16, 32],
        "down_block_types": ["DownEncoderBlock2D"] * 2, "up_block_types": ["UpDecoderBlock2D"] * 2,
        "norm_num_groups": 8, "sample_size": 32, "scaling_factor": 0.18215,
    },
}

PRESETS = {"full": _FULL, "tiny": _TINY}


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
