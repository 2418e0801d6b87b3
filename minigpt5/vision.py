"""Vision tower: BLIP-2 EVA ViT-g + ln_vision + Q-Former (32 queries) + llama_proj."""

from __future__ import annotations

import torch
from torch import nn
from transformers import Blip2QFormerConfig, Blip2QFormerModel, Blip2VisionConfig, Blip2VisionModel

from .config import CLIP_MEAN, CLIP_STD, LN_VISION_EPS, NUM_QUERY_TOKENS, VISION_IMAGE_SIZE


class VisionTower(nn.Module):
    """uint8 [N, 224, 224, 3] images → [N, 32, llm_hidden] embeddings, one block per `<ImageHere>`."""

    pixel_mean: torch.Tensor  # buffers, registered in __init__
    pixel_std: torch.Tensor

    def __init__(self, vision: dict, qformer: dict, llm_hidden_size: int):
        super().__init__()
        # Blip2VisionModel's post_layernorm is upstream's ln_vision: a torch LayerNorm with the default
        # eps 1e-5, while the ViT's own norms use the config's 1e-6 (upstream minigpt4/models/blip2.py:69).
        self.vision_model = Blip2VisionModel(Blip2VisionConfig(**vision))
        self.vision_model.post_layernorm.eps = LN_VISION_EPS
        self.qformer = Blip2QFormerModel(Blip2QFormerConfig(**qformer))
        self.query_tokens = nn.Parameter(torch.zeros(1, NUM_QUERY_TOKENS, qformer["hidden_size"]))
        self.llama_proj = nn.Linear(qformer["hidden_size"], llm_hidden_size)
        self.register_buffer("pixel_mean", torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(CLIP_STD).view(1, 3, 1, 1), persistent=False)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 NHWC → normalised float NCHW in the tower's dtype."""
        if images.dtype != torch.uint8 or images.shape[1:] != (VISION_IMAGE_SIZE, VISION_IMAGE_SIZE, 3):
            raise ValueError(
                f"expected uint8 [N, {VISION_IMAGE_SIZE}, {VISION_IMAGE_SIZE}, 3], got "
                f"{images.dtype} {list(images.shape)}"
            )
        pixels = images.permute(0, 3, 1, 2).float().div(255.0)
        pixels = (pixels - self.pixel_mean.float()) / self.pixel_std.float()
        return pixels.to(self.llama_proj.weight.dtype)

    @torch.inference_mode()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        pixels = self.normalize(images.to(self.llama_proj.weight.device))
        image_states = self.vision_model(pixel_values=pixels).last_hidden_state
        queries = self.query_tokens.expand(image_states.shape[0], -1, -1)
        query_states = self.qformer(query_embeds=queries, encoder_hidden_states=image_states).last_hidden_state
        return self.llama_proj(query_states)
