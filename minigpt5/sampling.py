"""Per-request sampling, batched: repetition penalty → temperature → top-k → top-p → draw (HF's order).

All rows of a decoder step are processed together in float32 on the logits' device (the GPU's, so
only the chosen ids cross to the host), each row with its own parameters; every reduction is per
row, and each row's uniform comes from its own CPU generator, so a request's tokens depend only on
its own logits and seed, never on which requests share its batch or on the device.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

FORCE_IMAGE_MODES = ("first", "end")


@dataclass
class SamplingParams:
    """Plain JSON-able values only: a request's parameters cross process boundaries as they are.
    The defaults are upstream's effective ones (config.DEFAULT_GENERATION, docs/API.md)."""

    max_tokens: int = 256  # sampled ids; the 7 forced vokens of each image do not count (upstream's max_new_tokens)
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 0.9
    top_k: int = 50  # 0 = off
    repetition_penalty: float = 2.0
    seed: int | None = None
    force_image: bool = False  # the answer holds max_images images
    force_image_mode: str = "first"  # first: [IMG0] is the first sampled id (upstream); end: where the answer would end
    max_images: int = 1  # voken blocks per answer; [IMG0] is banned once they are there

    def generator(self) -> torch.Generator:
        gen = torch.Generator(device="cpu")
        if self.seed is None:
            gen.seed()
        else:
            gen.manual_seed(self.seed % (2**63))
        return gen


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalties: torch.Tensor) -> torch.Tensor:
    """[B, V] logits; the ids each row already generated (`seen` [B, V] bool) are divided (or, if
    negative, multiplied) by the row's penalty."""
    penalties = penalties[:, None]
    penalised = torch.where(logits < 0, logits * penalties, logits / penalties)
    return torch.where(seen, penalised, logits)


def filter_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """[B, V] logits with per-row top_k (0 = off) and top_p (1 = off) applied as -inf."""
    vocab = logits.shape[-1]
    k = torch.where((top_k > 0) & (top_k < vocab), top_k, torch.full_like(top_k, vocab))
    if bool((k < vocab).any()):
        kth = torch.topk(logits, int(k.max()), dim=-1).values.gather(1, (k - 1)[:, None])
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if bool((top_p < 1.0).any()):
        # HF's TopPLogitsWarper: sort ascending, drop the prefix whose cumulative probability stays
        # <= 1 - top_p, always keep the most likely token. Only the sorted values are needed.
        # Tokens tied with the first kept value are kept, as top-k keeps ties.
        sorted_logits = sorted_values(logits)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        removed = (cumulative <= (1 - top_p)[:, None]).sum(-1).clamp(max=vocab - 1)
        logits = logits.masked_fill(logits < sorted_logits.gather(1, removed[:, None]), float("-inf"))
    return logits


def sorted_values(logits: torch.Tensor) -> torch.Tensor:
    """Each row's values in ascending order. On the CPU numpy's vectorised sort is several times
    faster than torch.sort, which also orders indices; on a GPU torch.sort stays on the device."""
    if logits.device.type == "cpu":
        return torch.from_numpy(np.sort(logits.numpy(), axis=-1))
    return torch.sort(logits, dim=-1).values


def sample_tokens(
    logits: torch.Tensor, params: list[SamplingParams], seen: torch.Tensor, generators: list[torch.Generator]
) -> list[int]:
    """One token id per row of [B, V] logits (banned ids already at -inf), on any device; `seen`
    [B, V] marks the ids each row generated so far (repetition penalty)."""
    logits = logits.float()
    device = logits.device

    def per_row(values: list) -> torch.Tensor:
        return torch.tensor(values, device=device)

    logits = apply_repetition_penalty(logits, seen.to(device), per_row([p.repetition_penalty for p in params]))
    temperature = per_row([p.temperature for p in params])
    greedy = temperature <= 0
    tokens = logits.argmax(-1)
    if not bool(greedy.all()):
        scaled = logits / torch.where(greedy, torch.ones_like(temperature), temperature)[:, None]
        scaled = filter_top_k_top_p(scaled, per_row([p.top_k for p in params]), per_row([p.top_p for p in params]))
        cumulative = scaled.softmax(-1).cumsum(-1)
        # Inverse-CDF draw with each row's own uniform: the batched equivalent of multinomial.
        uniform = torch.cat([torch.rand(1, generator=g) for g in generators]).to(device)[:, None] * cumulative[:, -1:]
        drawn = torch.searchsorted(cumulative, uniform, right=True).clamp(max=logits.shape[-1] - 1).flatten()
        tokens = torch.where(greedy, tokens, drawn)
    return tokens.tolist()
