"""Feature mapper: 8 voken states → 77 × d conditioning for Stable Diffusion (upstream MiniGPT-5
model.py:88-108: `fc`, `llm_to_t2i_mapping`, `t2i_decoder_prompt`).

Parameter names follow upstream (`fc.0`, `fc.2`, `llm_to_t2i_mapping.*`, `t2i_decoder_prompt`) so
converted checkpoints load without renaming.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn


class FeatureMapper(nn.Module):
    def __init__(
        self,
        llm_hidden_size: int,
        d_model: int,
        nhead: int,
        num_encoder_layers: int,
        num_decoder_layers: int,
        dim_feedforward: int,
        num_queries: int,
    ):
        super().__init__()
        self.llm_hidden_size = llm_hidden_size
        self.fc = nn.Sequential(nn.Linear(llm_hidden_size, d_model), nn.GELU(), nn.Linear(d_model, d_model))
        with warnings.catch_warnings():  # "enable_nested_tensor is True, but ... norm_first": harmless
            warnings.simplefilter("ignore", UserWarning)
            self.llm_to_t2i_mapping = nn.Transformer(
                d_model=d_model,
                nhead=nhead,
                num_encoder_layers=num_encoder_layers,
                num_decoder_layers=num_decoder_layers,
                dim_feedforward=dim_feedforward,
                dropout=0.0,
                batch_first=True,
                norm_first=True,
            )
        self.t2i_decoder_prompt = nn.Parameter(torch.zeros(1, num_queries, d_model))

    @torch.inference_mode()
    def forward(self, voken_states: torch.Tensor) -> torch.Tensor:
        """[B, 8, llm_hidden] → [B, num_queries, d_model] (SD `prompt_embeds`)."""
        source = self.fc(voken_states.to(self.t2i_decoder_prompt.dtype))
        target = self.t2i_decoder_prompt.expand(source.shape[0], -1, -1)
        return self.llm_to_t2i_mapping(src=source, tgt=target)
