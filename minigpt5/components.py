"""Builders of the five modules from an architecture dict (config.py / a weights manifest).

Modules are built directly on the target device and dtype (`torch.device` context), so the `full`
preset can be materialised on a GPU, or on the `meta` device to count parameters without memory.
"""

from __future__ import annotations

import contextlib
from typing import cast

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import LlamaConfig, LlamaForCausalLM

from .mapper import FeatureMapper
from .vision import VisionTower

COMPONENTS = ("vision", "llm", "mapper", "unet", "vae")


@contextlib.contextmanager
def building_on(device, dtype: torch.dtype = torch.float32):
    """Create parameters on `device` in `dtype` (default dtype switched for the duration)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


def llm_config(arch: dict) -> LlamaConfig:
    config = LlamaConfig(**arch["llm"])
    config._attn_implementation = "sdpa"
    return config


def build(name: str, arch: dict) -> torch.nn.Module:
    """One module with fresh (random) parameters on the current default device and dtype."""
    if name == "vision":
        return VisionTower(arch["vision"], arch["qformer"], arch["llm"]["hidden_size"])
    if name == "llm":
        return LlamaForCausalLM(llm_config(arch))
    if name == "mapper":
        return FeatureMapper(arch["llm"]["hidden_size"], **arch["mapper"])
    if name == "unet":  # diffusers' models are nn.Modules; its type hints do not show it
        return cast(torch.nn.Module, UNet2DConditionModel(**arch["unet"]))
    if name == "vae":
        return cast(torch.nn.Module, AutoencoderKL(**arch["vae"]))
    raise ValueError(f"unknown component {name!r}; one of {COMPONENTS}")


def parameter_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
