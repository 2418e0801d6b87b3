"""Per-request sampling, batched: repetition penalty → temperature → top-k → top-p → draw (HF's order).

All rows of a decoder step are processed together on the CPU in float32, each row with its own
parameters; every reduction is per row, and each row draws from its own generator, so a request's
tokens depend only on its own logits and seed, never on which requests share its batch.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 0.9
    top_k: int = 0  # 0 = off
    repetition_penalty: float = 2.0
    seed: int | None = None
    force_image: bool = False
    max_images: int = 1

    def generator(self) -> torch.Generator:
        gen = torch.Generator(device="cpu")
        if self.seed is None:
            gen.seed()
        else:
            gen.manual_seed(self.seed % (2**63))
        return gen


def apply_repetition_penalty(logits: torch.Tensor, previous: list[list[int]], penalties: torch.Tensor) -> torch.Tensor:
    """[B, V] logits; each row's already generated ids are divided (or, if negative, multiplied) by its penalty."""
    longest = max((len(p) for p in previous), default=0)
    if longest == 0:
        return logits
    ids = torch.zeros(len(previous), longest, dtype=torch.long)
    present = torch.zeros(len(previous), longest, dtype=torch.bool)
    for i, row in enumerate(previous):
        ids[i, :len(row)] = torch.tensor(row, dtype=torch.long)
        present[i, :len(row)] = True
    seen = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, ids, present)
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
        sorted_logits, order = torch.sort(logits, dim=-1)  # ascending, like HF's TopPLogitsWarper
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        remove = cumulative <= (1 - top_p)[:, None]
        remove[:, -1] = False  # always keep the most likely token
        logits = logits.masked_fill(torch.zeros_like(remove).scatter(1, order, remove), float("-inf"))
    return logits


def sample_tokens(logits: torch.Tensor, params: list[SamplingParams], previous: list[list[int]],
                  generators: list[torch.Generator]) -> list[int]:
    """One token id per row of [B, V] logits (banned ids already at -inf)."""
    logits = logits.float().cpu()
    logits = apply_repetition_penalty(logits, previous, torch.tensor([p.repetition_penalty for p in params]))
    temperature = torch.tensor([p.temperature for p in params])
    greedy = temperature <= 0
    tokens = logits.argmax(-1)
    if not bool(greedy.all()):
        scaled = logits / torch.where(greedy, torch.ones_like(temperature), temperature)[:, None]
        scaled = filter_top_k_top_p(scaled, torch.tensor([p.top_k for p in params]),
                                    torch.tensor([p.top_p for p in params]))
        cumulative = scaled.softmax(-1).cumsum(-1)
        # Inverse-CDF draw with each row's own uniform: the batched equivalent of multinomial.
        uniform = torch.cat([torch.rand(1, generator=g) for g in generators])[:, None] * cumulative[:, -1:]
        drawn = torch.searchsorted(cumulative, uniform, right=True).clamp(max=logits.shape[-1] - 1).flatten()
        tokens = torch.where(greedy, tokens, drawn)
    return tokens.tolist()


def sample_token(logits: torch.Tensor, params: SamplingParams, previous: list[int],
                 generator: torch.Generator) -> int:
    """One row's token from [V] logits: the batched sampler on a batch of one."""
    return sample_tokens(logits[None], [params], [previous], [generator])[0]
