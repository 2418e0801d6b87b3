"""Where a served model finds its weights and device: config.pbtxt parameters, else environment."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch

from ..launcher.contract import DEVICE_ENV, WEIGHTS_ENV
from ..stages import resolve_device, resolve_dtype
from ..weights.layout import WeightsDir



def open_weights(params: dict) -> WeightsDir:
    path = params.get("weights") or os.environ.get(WEIGHTS_ENV)
    if not path:
        raise RuntimeError(f"no weights: set the `weights` parameter in config.pbtxt or ${WEIGHTS_ENV}")
    return WeightsDir(path)


def device_for(args: dict, params: dict) -> str:
    """Triton's instance kind decides (KIND_GPU → cuda:N); `device` parameter or $MINIGPT5_DEVICE override."""
    wanted = params.get("device") or os.environ.get(DEVICE_ENV) or "auto"
    if wanted != "auto":
        return resolve_device(wanted)
    if args.get("model_instance_kind") == "GPU":
        return f"cuda:{args['model_instance_device_id']}"
    return "cpu"


def dtype_for(params: dict, key: str, device: str, gpu_default: str):
    return resolve_dtype(params.get(key) or ("fp32" if device == "cpu" else gpu_default), device)



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


def set_cpu_threads(params: dict) -> None:
    """`cpu_threads` (where a config declares it): torch's intra-op threads in this stub; 0 or absent =
    torch's default (one per core). Every stub defaults to all cores, so on a small CPU host the
    stubs' threads compete; one thread for the decoder leaves the other cores to the serving work."""
    threads = int(params.get("cpu_threads") or 0)
    if threads < 0:
        raise ValueError(f"cpu_threads: must be 0 (torch's default) or more, got {threads}")
    if threads:
        torch.set_num_threads(threads)
