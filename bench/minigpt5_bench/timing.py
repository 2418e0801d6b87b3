"""Timing primitives: device-synchronised wall clock, medians, and the machine's description."""

from __future__ import annotations

import platform
import sys
import time
from importlib import metadata
from typing import Any

import torch

from .stats import summarize

# Datasheet HBM bandwidth in GB/s, matched against torch.cuda.get_device_name (first match wins).
# "NVIDIA H100 80GB HBM3" is the SXM part. An H100 SXM measured about 3.0 TB/s on a device-to-device
# copy: the datasheet floor is optimistic by roughly 10%.
HBM_GBPS = (
    ("GH200", 4000.0),
    ("H200", 4800.0),
    ("H100 NVL", 3900.0),
    ("H100 PCIe", 2000.0),
    ("H100", 3350.0),
    ("A100-SXM4-80GB", 2039.0),
    ("A100 80GB PCIe", 1935.0),
    ("A100", 1555.0),
    ("L40S", 864.0),
)


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn, device: torch.device, *, repeats: int, warmup: int) -> dict:
    """Median wall-clock ms of `fn()` after `warmup` untimed calls, synchronised before and after."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(max(1, repeats)):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        samples.append((time.perf_counter() - start) * 1e3)
    return summarize(samples)


class Stopwatch:
    """Synchronised split times in ms since construction."""

    def __init__(self, device: torch.device):
        self.device = device
        synchronize(device)
        self.start = time.perf_counter()

    def ms(self) -> float:
        synchronize(self.device)
        return (time.perf_counter() - self.start) * 1e3


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def hbm_bandwidth(device: torch.device, override_gbps: float | None) -> dict:
    """{"gbps", "source"}: the flag, else the datasheet value for a known GPU, else null."""
    if override_gbps:
        return {"gbps": float(override_gbps), "source": "--hbm-gbps"}
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, gbps in HBM_GBPS:
            if key in name:
                return {"gbps": gbps, "source": f"datasheet for {name!r} (matched {key!r})"}
        return {"gbps": None, "source": f"unknown GPU {name!r}: pass --hbm-gbps"}
    return {"gbps": None, "source": f"{device.type}: no HBM floor (pass --hbm-gbps to set one)"}


def environment(device: torch.device) -> dict:
    env: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": _version("transformers"),
        "diffusers": _version("diffusers"),
        "numpy": _version("numpy"),
        "machine": platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "device": str(device),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(
            {
                "gpu": props.name,
                "gpu_memory_gib": round(props.total_memory / 2**30, 1),
                "compute_capability": f"{props.major}.{props.minor}",
                "cuda": torch.version.cuda,
                "multiprocessors": props.multi_processor_count,
            }
        )
    return env


def memory(device: torch.device) -> dict | None:
    if device.type != "cuda":
        return None
    return {
        "max_allocated_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2),
        "max_reserved_gib": round(torch.cuda.max_memory_reserved(device) / 2**30, 2),
    }
