"""`image_decoder`: voken states → mapper → UNet/VAE with CFG → uint8 image, batched across requests.

Each request row carries its own seed and guidance scale, so its image does not depend on its batch
company; rows with the same scheduler and step count are decoded together (ImageStage.decode).
"""

from __future__ import annotations

import time

import torch

from ..image_decoder import SCHEDULERS, ImageJob
from ..stages import ImageStage
from . import runtime, triton_io


class ImageDecoderModel:
    def __init__(self, args: dict, metrics=None):
        where = runtime.placement(args, gpu_dtype="fp16")
        self.stage = ImageStage.load(where.weights, where.device, where.dtype)
        self.metrics = metrics
        self.stage.warmup()
        triton_io.log_info(where.describe("image_decoder"))

    def execute(self, requests: list) -> list:
        jobs, counts = [], []
        for request in requests:
            rows = self._jobs(request)
            jobs += rows
            counts.append(len(rows))
        started = time.monotonic()
        images = self.stage.decode(jobs)
        triton_io.log_info(
            f"image_decoder: {len(jobs)} image(s) from {len(requests)} request(s) in {time.monotonic() - started:.2f}s"
        )
        if self.metrics:
            self.metrics.observe_image_batch(len(jobs))
        replies, start = [], 0
        for count in counts:
            replies.append(triton_io.response([triton_io.tensor("image", images[start : start + count].copy())]))
            start += count
        return replies

    @staticmethod
    def _jobs(request) -> list[ImageJob]:
        states = triton_io.required_input(request, "voken_states")
        seeds = triton_io.required_input(request, "seed").reshape(-1)
        scales = triton_io.required_input(request, "guidance_scale").reshape(-1)
        steps = triton_io.required_input(request, "num_inference_steps").reshape(-1)
        schedulers = triton_io.required_input(request, "scheduler_id").reshape(-1)
        return [
            ImageJob(
                torch.from_numpy(states[i].copy()),
                int(seeds[i]),
                float(scales[i]),
                int(steps[i]),
                SCHEDULERS[int(schedulers[i])],
            )
            for i in range(len(states))
        ]
