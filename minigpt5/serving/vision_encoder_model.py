"""`vision_encoder`: uint8 224² images → 32×H embeddings, batched across requests by Triton."""

from __future__ import annotations

import numpy as np

from ..stages import VisionStage
from . import runtime, triton_io


class VisionEncoder:
    def __init__(self, args: dict):
        where = runtime.placement(args, gpu_dtype="fp16")
        self.stage = VisionStage.load(where.weights, where.device, where.dtype)
        self.stage.warmup()
        triton_io.log_info(where.describe("vision_encoder"))

    def execute(self, requests: list) -> list:
        """One forward for all images of all requests in Triton's batch, split back per request."""
        batches = [triton_io.required_input(r, "images") for r in requests]
        embeds = self.stage.encode(np.concatenate(batches)).numpy()
        replies, start = [], 0
        for batch in batches:
            replies.append(triton_io.response([triton_io.tensor("image_embeds", embeds[start : start + len(batch)])]))
            start += len(batch)
        return replies
