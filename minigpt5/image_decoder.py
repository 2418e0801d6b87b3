"""Image decoder: voken states → feature mapper → SD UNet with classifier-free guidance → VAE → image.

Classifier-free guidance runs only when guidance_scale > 1, as diffusers' StableDiffusionPipeline
(`do_classifier_free_guidance`): at ≤ 1 the UNet sees the conditional batch alone (half the work)
and its prediction is used as it is.

Requests can share a batch: each has its own seed (initial noise drawn on CPU from its own
generator) and guidance scale, and every operation is per sample, so a request's image does not
depend on its batch company beyond float rounding. Requests in one batch share the scheduler and the
number of steps; callers group by those (`batch_key`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from diffusers import DPMSolverMultistepScheduler, PNDMScheduler

from .config import NUM_VOKENS, SCHEDULER
from .mapper import FeatureMapper

SCHEDULERS = ("pndm", "dpm")


def make_scheduler(name: str, config: dict = SCHEDULER):
    if name == "pndm":  # upstream's default, as in SD 2.1-base's scheduler_config
        return PNDMScheduler(**config, skip_prk_steps=True, set_alpha_to_one=False)
    if name == "dpm":  # DPM-Solver++ (2M): good images in 20-25 steps
        return DPMSolverMultistepScheduler(**config, algorithm_type="dpmsolver++", solver_order=2)
    raise ValueError(f"scheduler: must be one of {list(SCHEDULERS)}, got {name!r}")


def image_seed(request_seed: int, image_index: int) -> int:
    """Seed of the k-th image of a request: fixed by the request's seed, different per image."""
    return (request_seed + 7919 * (image_index + 1)) % (2**63)


@dataclass
class ImageJob:
    voken_states: torch.Tensor  # [8, H]
    seed: int
    guidance_scale: float = 7.5
    num_inference_steps: int = 50
    scheduler: str = "pndm"

    @property
    def guided(self) -> bool:
        """Classifier-free guidance on (diffusers: guidance_scale > 1)."""
        return self.guidance_scale > 1.0

    @property
    def batch_key(self) -> tuple:
        return (self.scheduler, self.num_inference_steps, self.guided)


class ImageDecoder:
    def __init__(self, mapper: FeatureMapper, unet, vae, scheduler_config: dict = SCHEDULER):
        self.mapper = mapper.eval()
        self.unet = unet.eval()
        self.vae = vae.eval()
        self.scheduler_config = scheduler_config
        self.vae_scale = 2 ** (len(vae.config.block_out_channels) - 1)
        # The unconditional branch: mapper(fc(zeros)), a constant of the checkpoint (upstream model.py:326-327).
        zeros = torch.zeros(1, NUM_VOKENS, mapper.llm_hidden_size, device=self.device, dtype=self.mapper_dtype)
        self.negative_embeds = self.mapper(zeros)

    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def mapper_dtype(self) -> torch.dtype:
        return self.mapper.t2i_decoder_prompt.dtype

    @property
    def image_size(self) -> int:
        return self.unet.config.sample_size * self.vae_scale

    def initial_latents(self, seed: int) -> torch.Tensor:
        shape = (1, self.unet.config.in_channels, self.unet.config.sample_size, self.unet.config.sample_size)
        return torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed))

    @torch.inference_mode()
    def decode(self, jobs: list[ImageJob], progress: Callable[[int, int], None] | None = None) -> np.ndarray:
        """Images for jobs sharing one `batch_key`, as uint8 [B, size, size, 3]."""
        if len({job.batch_key for job in jobs}) != 1:
            raise ValueError("jobs in one decode call must share scheduler, num_inference_steps and guidance on/off")
        guided = jobs[0].guided
        scheduler = make_scheduler(jobs[0].scheduler, self.scheduler_config)
        scheduler.set_timesteps(jobs[0].num_inference_steps, device=self.device)
        states = torch.stack([job.voken_states for job in jobs]).to(self.device, self.mapper_dtype)
        cond = self.mapper(states).to(self.unet.dtype)
        uncond = self.negative_embeds.to(self.unet.dtype).expand_as(cond)
        prompt_embeds = torch.cat([uncond, cond]) if guided else cond
        scale = torch.tensor([job.guidance_scale for job in jobs], device=self.device, dtype=torch.float32).view(
            -1, 1, 1, 1
        )
        latents = torch.cat([self.initial_latents(job.seed) for job in jobs]).to(self.device, torch.float32)
        latents = latents * scheduler.init_noise_sigma
        for i, t in enumerate(scheduler.timesteps):
            model_input = scheduler.scale_model_input(torch.cat([latents, latents]) if guided else latents, t)
            noise = self.unet(model_input.to(self.unet.dtype), t, encoder_hidden_states=prompt_embeds).sample.float()
            if guided:
                noise_uncond, noise_cond = noise.chunk(2)
                noise = noise_uncond + scale * (noise_cond - noise_uncond)
            latents = scheduler.step(noise, t, latents).prev_sample
            if progress:
                progress(i + 1, len(scheduler.timesteps))
        return self.latents_to_images(latents)

    def latents_to_images(self, latents: torch.Tensor) -> np.ndarray:
        latents = latents / self.vae.config.scaling_factor
        images = self.vae.decode(latents.to(self.vae.dtype)).sample.float()
        images = (images / 2 + 0.5).clamp(0, 1)
        return (images.permute(0, 2, 3, 1) * 255).round().to(torch.uint8).cpu().numpy()
