"""fp8 (e4m3) weights for the LLM's decoder layers.

Decoding a 7B model is bound by reading its weights from HBM once per step: at 1 byte per weight
instead of bf16's 2, each step reads half as much, and Vicuna-7B's floor on an H100 (~3.35 TB/s)
drops from about 4 ms to about 2 ms per token. Weights get one scale per output channel, activations
one per token (computed on the fly), and `torch._scaled_mm` multiplies the fp8 operands with the
scales applied to its output. No host syncs and no branching on tensor values: CUDA-graph capturable.
"""

from __future__ import annotations

import torch
from torch import nn

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448
MIN_SCALE = 1e-12  # an all-zero row quantizes to zeros instead of 0/0
ALIGNMENT = 16  # _scaled_mm on CUDA wants in/out features divisible by 16


class Fp8Linear(nn.Module):
    """`nn.Linear` with an fp8 weight [out, in] and a float32 scale per output channel."""

    def __init__(self, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.weight_scale = nn.Parameter(weight_scale, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Fp8Linear:
        weight = linear.weight.detach()
        scale = _row_scales(weight)
        bias = None if linear.bias is None else linear.bias.detach().clone()
        return cls(_to_fp8(weight, scale), scale.flatten(), bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        scale = _row_scales(rows)
        # CUDA's rowwise kernels write bf16 only; the CPU writes the activation dtype directly.
        out_dtype = x.dtype if x.device.type == "cpu" else torch.bfloat16
        out = torch._scaled_mm(
            _to_fp8(rows, scale),
            self.weight.t(),
            scale_a=scale,
            scale_b=self.weight_scale.view(1, -1),
            out_dtype=out_dtype,
        ).to(x.dtype)
        if self.bias is not None:
            out = out + self.bias
        return out.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def quantize_llm_fp8(llm) -> dict:
    """Replace, in place, every `nn.Linear` of `llm.model.layers` (q/k/v/o, gate/up/down) whose
    dimensions are multiples of 16 by an `Fp8Linear`; the old weights go with the old modules.
    Embeddings, norms and `lm_head` keep the model dtype: the lm_head stays exact for sampling
    accuracy. Call after moving the model to its device and dtype (`.to(dtype)` would cast the fp8
    weights too). Returns counts and the parameter bytes of the replaced layers before and after."""
    stats = dict.fromkeys(("quantized_linears", "skipped_linears", "weight_bytes_before", "weight_bytes_after"), 0)
    for layer in llm.model.layers:
        for name, module in list(layer.named_modules()):
            if not isinstance(module, nn.Linear):
                continue
            if module.in_features % ALIGNMENT or module.out_features % ALIGNMENT:
                stats["skipped_linears"] += 1
                continue
            quantized = Fp8Linear.from_linear(module)
            parent, _, child = name.rpartition(".")
            setattr(layer.get_submodule(parent), child, quantized)
            stats["quantized_linears"] += 1
            stats["weight_bytes_before"] += _parameter_bytes(module)
            stats["weight_bytes_after"] += _parameter_bytes(quantized)
    return stats


def fp8_available(device: str | torch.device) -> tuple[bool, str]:
    """Whether `Fp8Linear` runs on `device` (a tiny bf16 probe), and why not when it does not."""
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return False, "CUDA is not available"
        capability = torch.cuda.get_device_capability(device)
        if capability < (8, 9):
            return False, f"fp8 matmuls need compute capability 8.9+ (Ada, Hopper), this GPU has {capability}"
    elif device.type != "cpu":
        return False, f"no fp8 path on {device.type}"
    probe = Fp8Linear.from_linear(nn.Linear(ALIGNMENT, ALIGNMENT, device=device, dtype=torch.bfloat16))
    try:
        probe(torch.ones(2, ALIGNMENT, device=device, dtype=torch.bfloat16))
    except (RuntimeError, ValueError) as error:
        return False, f"torch._scaled_mm failed on {device}: {error}"
    return True, f"fp8 matmuls run on {device}"


def _row_scales(t: torch.Tensor) -> torch.Tensor:
    """[rows, 1] float32: each row's absolute maximum maps to the largest fp8 value."""
    return (t.abs().amax(dim=-1, keepdim=True).float() / FP8_MAX).clamp(min=MIN_SCALE)


def _to_fp8(t: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    # Clamped: a value that rounds past 448 would become NaN (e4m3fn has no infinity).
    return (t / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)


def _parameter_bytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())
