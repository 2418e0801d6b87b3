"""Where a served model finds its weights and device: config.pbtxt parameters, else environment."""
from __future__ import annotations

import os

from ..stages import resolve_device, resolve_dtype
from ..weights.layout import WeightsDir

WEIGHTS_ENV = "MINIGPT5_WEIGHTS"
DEVICE_ENV = "MINIGPT5_DEVICE"


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

