"""Where each part of the model runs and in which dtype: the device (`auto` = a GPU when there is one;
a served model follows its Triton instance kind), the dtype (fp32 on a CPU, the part's own default on a
GPU unless told otherwise), switches that default to on-GPU-only, and a stub's CPU threads."""

from __future__ import annotations

import os

import torch

from .launcher.contract import DEVICE_ENV


def resolve_device(device: str | None) -> str:
    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def resolve_dtype(dtype: str | None, device: str, gpu_default: str = "bf16") -> torch.dtype:
    """fp32 on CPU; on a GPU `gpu_default` (bf16 for the LLM side, fp16 for the vision tower) unless told otherwise."""
    if dtype in (None, "auto"):
        dtype = "fp32" if device == "cpu" else gpu_default
    return {
        "fp32": torch.float32,
        "float32": torch.float32,
        "bf16": torch.bfloat16,
        "bfloat16": torch.bfloat16,
        "fp16": torch.float16,
        "float16": torch.float16,
    }[dtype]


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


def on_gpu_by_default(params: dict, key: str, device: str) -> bool:
    """A config.pbtxt switch: true, false, or auto (= on a GPU only)."""
    setting = params.get(key, "auto")
    if setting not in ("auto", "true", "false"):
        raise ValueError(f"{key}: must be auto, true or false, got {setting!r}")
    return device != "cpu" if setting == "auto" else setting == "true"


def set_cpu_threads(params: dict) -> None:
    """`cpu_threads` (where a config declares it): torch's intra-op threads in this stub; 0 or absent =
    torch's default (one per core). Every stub defaults to all cores, so on a small CPU host the
    stubs' threads compete; one thread for the decoder leaves the other cores to the serving work."""
    threads = int(params.get("cpu_threads") or 0)
    if threads < 0:
        raise ValueError(f"cpu_threads: must be 0 (torch's default) or more, got {threads}")
    if threads:
        torch.set_num_threads(threads)
