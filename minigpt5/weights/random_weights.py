"""Random weights in the real layout at real size: `full` (the real MiniGPT-5, ~17.8 GB in bf16) or `slim`
(the real widths with the fewest layers, config.py). Built and written one module at a time, so peak
memory is the largest module (the LLM), never the whole model; the same seed gives the same tensors.

The tokenizer is the benchmarks' word-level one with LLaMA's 32000 ids plus the MiniGPT-5 tokens
(bench/models.py): the embedding and LM head have their real shapes without any file from a hub.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .. import components
from ..config import preset
from .layout import make_manifest, save_weights

RANDOM_PRESETS = ("full", "slim")
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
LLAMA_VOCAB = 32000  # the real tokenizer's size before the MiniGPT-5 tokens: the stand-in matches it


def random_module(name: str, arch: dict, seed: int, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """Module `name` with its constructors' random init, seeded per module (seed * 1000 + its index)."""
    torch.manual_seed(seed * 1000 + components.COMPONENTS.index(name))
    with components.building_on("cpu", dtype):
        module = components.build(name, arch)
    spread_learned_queries(module)
    return module


def spread_learned_queries(module: torch.nn.Module) -> None:
    """Query tokens start at zero in the constructors; give them upstream's N(0, 0.02) init so the
    32 / 77 queries differ from each other (otherwise every query yields the same output)."""
    for name in ("query_tokens", "t2i_decoder_prompt"):
        param = getattr(module, name, None)
        if param is not None:
            with torch.no_grad():
                param.normal_(0.0, 0.02)


def build_random_weights(
    out_dir: str | Path, preset_name: str = "slim", dtype: str = "bf16", seed: int = 0, progress: bool = False
) -> Path:
    if preset_name not in RANDOM_PRESETS:
        raise ValueError(
            f"preset {preset_name!r}: random weights are built for {', '.join(RANDOM_PRESETS)} "
            f"(tiny: `minigpt5 weights tiny`)"
        )
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: one of {', '.join(DTYPES)}")
    from ..tokenizer import word_level_tokenizer

    tokenizer = word_level_tokenizer(LLAMA_VOCAB)
    manifest = make_manifest(
        preset(preset_name), tokenizer, source={"kind": f"{preset_name}-random", "seed": seed, "dtype": dtype}
    )
    arch = manifest["architecture"]
    return save_weights(
        out_dir,
        manifest,
        tokenizer,
        lambda name: random_module(name, arch, seed, DTYPES[dtype]).state_dict(),
        progress=progress,
    )
