"""What a served model reads from Triton's arguments: its config.pbtxt parameters, its weights (the
`weights` parameter, else the environment) and its placement (placement.py decides)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch

from ..launcher.contract import WEIGHTS_ENV
from ..placement import device_for, dtype_for, set_cpu_threads
from ..weights.layout import WeightsDir


def open_weights(params: dict) -> WeightsDir:
    path = params.get("weights") or os.environ.get(WEIGHTS_ENV)
    if not path:
        raise RuntimeError(f"no weights: set the `weights` parameter in config.pbtxt or ${WEIGHTS_ENV}")
    return WeightsDir(path)


def model_parameters(args: dict) -> dict:
    """`parameters { key: ... value { string_value: ... } }` of config.pbtxt as a plain dict."""
    config = json.loads(args["model_config"])
    return {k: v["string_value"] for k, v in config.get("parameters", {}).items()}


@dataclass
class Placement:
    """What a served model needs to load its stage: its parameters, weights, device and dtype."""

    params: dict
    weights: WeightsDir
    device: str
    dtype: torch.dtype

    def describe(self, model: str) -> str:
        return f"{model}: weights {self.weights.path} on {self.device} ({self.dtype})"


def placement(args: dict, gpu_dtype: str) -> Placement:
    params = model_parameters(args)
    device = device_for(args, params)
    set_cpu_threads(params)
    return Placement(params, open_weights(params), device, dtype_for(params, "dtype", device, gpu_dtype))
